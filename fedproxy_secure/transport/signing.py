"""Signed requests: every call of an enrolled client carries an Ed25519 signature.

The signed message is the canonical string::

    FEDPROXY-REQ-v1\n<METHOD>\n<path>\n<sha256(body) hex>\n<round>\n<timestamp>\n<nonce>\n<client id>

sent in headers ``X-FP-Client``, ``X-FP-Round``, ``X-FP-Timestamp`` (integer seconds),
``X-FP-Nonce`` (128-bit random, hex) and ``X-FP-Signature`` (base64url). The verifier refuses an
unknown client, a bad signature, a timestamp outside ``±skew`` seconds of its clock and any nonce
already seen from that client (nonces are remembered in the store until they can no longer pass
the skew check, so the cache survives restarts).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedproxy_secure.errors import SecurityError
from fedproxy_secure.wire.codec import b64u, b64u_decode  # the one codec (re-exported for callers)

PREFIX = b"FEDPROXY-REQ-v1"
H_CLIENT, H_ROUND, H_TS, H_NONCE, H_SIG = ("x-fp-client", "x-fp-round", "x-fp-timestamp",
                                           "x-fp-nonce", "x-fp-signature")
NO_ROUND = "-"


def canonical_request(method: str, path: str, body: bytes, round_id: str, ts: int, nonce: str,
                      client_id: str) -> bytes:
    """The exact bytes that are signed for a request."""
    parts = [PREFIX, method.upper().encode(), path.encode(), hashlib.sha256(body).hexdigest().encode(),
             str(round_id).encode(), str(int(ts)).encode(), nonce.encode(), client_id.encode()]
    return b"\n".join(parts)


def sign_request(key: Ed25519PrivateKey, client_id: str, method: str, path: str, body: bytes,
                 round_id: str | int = NO_ROUND, now: float | None = None) -> dict[str, str]:
    """Headers that authenticate this request as ``client_id`` (fresh nonce each call)."""
    ts = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    sig = key.sign(canonical_request(method, path, body, str(round_id), ts, nonce, client_id))
    return {H_CLIENT: client_id, H_ROUND: str(round_id), H_TS: str(ts), H_NONCE: nonce, H_SIG: b64u(sig)}


class NonceStore(Protocol):
    """Remembers nonces; ``remember_nonce`` returns False when ``(client, nonce)`` was seen."""

    def remember_nonce(self, client_id: str, nonce: str, expires_at: float) -> bool: ...


class MemoryNonceStore:
    """In-memory :class:`NonceStore` (tests)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], float] = {}

    def remember_nonce(self, client_id: str, nonce: str, expires_at: float) -> bool:
        """Return False on a replay, else record the nonce."""
        k = (client_id, nonce)
        if k in self._seen:
            return False
        self._seen[k] = expires_at
        return True


@dataclass(frozen=True)
class VerifiedRequest:
    """Who sent a request, and for which round."""

    client_id: str
    round_id: str
    ts: int


class RequestVerifier:
    """Verifies signed requests against enrolled public keys, a clock window and a nonce cache."""

    def __init__(self, lookup_key: Callable[[str], bytes | None], nonces: NonceStore,
                 skew_s: int = 120, clock: Callable[[], float] = time.time) -> None:
        self._lookup = lookup_key
        self._nonces = nonces
        self.skew_s = skew_s
        self._clock = clock

    def verify(self, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> VerifiedRequest:
        """Return the verified sender or raise ``SecurityError`` naming the reason."""
        h = {k.lower(): v for k, v in headers.items()}
        missing = [k for k in (H_CLIENT, H_ROUND, H_TS, H_NONCE, H_SIG) if not h.get(k)]
        if missing:
            raise SecurityError(f"unsigned request: missing headers {missing}")
        client_id, round_id, nonce = h[H_CLIENT], h[H_ROUND], h[H_NONCE]
        try:
            ts = int(h[H_TS])
            sig = b64u_decode(h[H_SIG])
        except ValueError:
            raise SecurityError("malformed signature headers") from None
        if len(nonce) != 32 or any(c not in "0123456789abcdef" for c in nonce):
            raise SecurityError("malformed nonce: expected 32 lowercase hex characters")
        now = self._clock()
        if abs(now - ts) > self.skew_s:
            raise SecurityError(f"request timestamp outside the ±{self.skew_s}s window (clock skew or expired)")
        raw = self._lookup(client_id)
        if raw is None:
            raise SecurityError(f"unknown client {client_id!r}: not enrolled")
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(
                sig, canonical_request(method, path, body, round_id, ts, nonce, client_id))
        except (InvalidSignature, ValueError):
            raise SecurityError("bad request signature") from None
        # only after the signature checks out, so strangers cannot fill the nonce table
        if not self._nonces.remember_nonce(client_id, nonce, ts + self.skew_s + 1):
            raise SecurityError("replayed request (nonce already used)")
        return VerifiedRequest(client_id, round_id, ts)
