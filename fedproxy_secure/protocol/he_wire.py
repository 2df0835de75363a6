"""HE (CKKS) secure aggregation over the network: messages, settings and checks both parties use.

The stage machines are in :mod:`fedproxy_secure.protocol.modes.he`; this module holds what they
share: the validated ``federation.he`` settings, the per-round parameters read from the signed round
config (:class:`HERound`), the message field sets, the signed payloads and the key-holder rotation.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from fedproxy_secure.errors import ConfigError, ProtocolAbort, SecurityError
from fedproxy_secure.wire.codec import b64d, b64e
from fedproxy_secure.protocol.names import HE_INPUT_DOMAIN as INPUT_DOMAIN
from fedproxy_secure.protocol.names import HE_KEYS_DOMAIN as KEYS_DOMAIN
from fedproxy_secure.protocol.names import HE_STAGES

__all__ = ["HE_STAGES", "KEYS_DOMAIN", "INPUT_DOMAIN", "DESCRIPTOR_MAX", "STATEMENT_MAX", "MIN_STAT_SECURITY",
           "MESSAGE_FIELDS", "he_settings", "key_holder_for", "signed_payload", "signed_digest_payload", "check_shape", "HERound",
           "parse_statement", "b64e", "b64d"]

#: a public descriptor is ~235 KB for N = 8192 (no relinearisation/Galois keys); refuse beyond this
DESCRIPTOR_MAX = 4 << 20
STATEMENT_MAX = 1 << 20
MIN_STAT_SECURITY = 30
OPTION_KEYS = {"poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits", "encryption", "flood",
               "stat_security", "max_decryptions", "verify_aggregate", "max_clients"}
MESSAGE_FIELDS = {
    "he_keys": {"type", "sid", "descriptor", "signature"},
    "he_ready": {"type", "sid"},
    "he_input": {"type", "sid", "envelope", "signature"},
    "he_plain": {"type", "sid", "sum", "aggregate_sha256"},
    "he_done": {"type", "sid"},
}


# ----------------------------------------------------------------------------- settings


def he_settings(opts: dict | None, clip_norm: float) -> dict:
    """Validated, normalised ``federation.he`` options (``ConfigError`` naming the field).

    Over the network only public-key encryption and noise flooding are allowed: ``symmetric``
    would put the secret key on every client, and decrypting without flooding leaks the key
    (IND-CPA-D, eprint 2020/1533). ``max_clients`` bounds the cohort for the capacity check
    (``clip_norm x max_clients`` must fit the CKKS headroom).
    """
    from fedproxy_secure.secagg.he_params import check_capacity, validate_params

    o = dict(opts or {})
    unknown = set(o) - OPTION_KEYS
    if unknown:
        raise ConfigError(f"federation.he: unknown keys {sorted(unknown)}; allowed: {sorted(OPTION_KEYS)}")
    if o.get("encryption", "public") != "public":
        raise ConfigError("federation.he.encryption: only 'public' over the network ('symmetric' puts the CKKS "
                          "secret key on every client)")
    if o.get("flood", True) is not True:
        raise ConfigError("federation.he.flood: noise flooding cannot be turned off over the network (decrypted "
                          "aggregates would leak the CKKS secret key, eprint 2020/1533)")
    params = validate_params(o.get("poly_modulus_degree", 8192), tuple(o.get("coeff_mod_bit_sizes", (60, 40))),
                             o.get("scale_bits", 40), "public")
    stat, maxd, maxc = (int(o.get("stat_security", MIN_STAT_SECURITY)), int(o.get("max_decryptions", 100)),
                        int(o.get("max_clients", 1024)))
    if stat < MIN_STAT_SECURITY:
        raise ConfigError(f"federation.he.stat_security={stat}: must be >= {MIN_STAT_SECURITY}")
    if maxd < 1 or maxc < 2:
        raise ConfigError("federation.he.max_decryptions must be >= 1 and federation.he.max_clients >= 2")
    check_capacity(params, float(clip_norm), maxc, math.inf)
    return {"params": params.to_json(), "stat_security": stat, "max_decryptions": maxd,
            "verify_aggregate": bool(o.get("verify_aggregate", True)), "max_clients": maxc}


def key_holder_for(round_id: int, n: int) -> int:
    """Secagg id of round ``round_id``'s key holder in a cohort of ``n`` (rotates over the cohort)."""
    return (int(round_id) - 1) % int(n) + 1


def signed_payload(session_id: bytes, sid: int, blob: bytes, context: bytes = b"") -> bytes:
    """What a client signs for a descriptor or envelope: session id, the round's binding context (the
    signed round config's digest, :mod:`fedproxy_secure.wire.binding`), secagg id, SHA-256 of the blob."""
    return signed_digest_payload(session_id, sid, hashlib.sha256(blob).digest(), context)


def signed_digest_payload(session_id: bytes, sid: int, blob_sha256: bytes, context: bytes = b"") -> bytes:
    """:func:`signed_payload` from the blob's SHA-256 (the key holder checks contributions by digest)."""
    from fedproxy_secure.wire.binding import length_prefixed

    return bytes(session_id) + length_prefixed(bytes(context)) + int(sid).to_bytes(8, "big") + bytes(blob_sha256)


def check_shape(msg: object, want: str, sid: int) -> dict:
    """``msg`` must be a dict of type ``want`` with exactly its fields, sent by secagg id ``sid``."""
    if not isinstance(msg, dict) or msg.get("type") != want:
        got = msg.get("type") if isinstance(msg, dict) else type(msg).__name__
        raise ProtocolAbort(f"expected a {want} message, got {got!r}")
    if set(msg) != MESSAGE_FIELDS[want]:
        raise ProtocolAbort(f"{want}: fields {sorted(msg)}, expected {sorted(MESSAGE_FIELDS[want])}")
    if msg["sid"] != sid or isinstance(msg["sid"], bool):
        raise ProtocolAbort(f"{want}: claims secagg id {msg['sid']!r}, the sender is {sid}")
    return msg


@dataclass(frozen=True)
class HERound:
    """The HE parameters of one round, as read from the operator-signed round config."""

    params: object  # CKKSParams
    flooding: object  # FloodingPolicy
    key_holder: int
    statement_key: bytes
    verify_aggregate: bool
    identities: dict

    @classmethod
    def from_options(cls, options: dict) -> "HERound":
        """Parse ``secagg_options`` (``he`` and ``identities``); ``ProtocolAbort`` if anything is off."""
        from fedproxy_secure.secagg.he import FloodingPolicy
        from fedproxy_secure.secagg.he_params import validate_params
        from fedproxy_secure.protocol.modes.masking import identities

        he = (options or {}).get("he")
        if not isinstance(he, dict):
            raise ProtocolAbort("round config: HE mode without secagg_options.he")
        try:
            p = he["params"]
            params = validate_params(p["poly_modulus_degree"], tuple(p["coeff_mod_bit_sizes"]), p["scale_bits"],
                                     p["encryption"])
            flooding = FloodingPolicy(int(he["stat_security"]), int(he["max_decryptions"]), True)
            kh, skey = int(he["key_holder"]), b64d(he["statement_key"], "secagg_options.he.statement_key", 32)
            ids = identities(options)
        except (KeyError, TypeError, ValueError, ConfigError, ProtocolAbort) as exc:
            raise ProtocolAbort(f"round config: bad secagg_options.he ({exc})") from None
        if params.encryption != "public" or flooding.stat_security < MIN_STAT_SECURITY:
            raise ProtocolAbort("round config: HE over the network needs public-key encryption and "
                                f"stat_security >= {MIN_STAT_SECURITY}")
        if len(skey) != 32 or not ids or kh not in ids:
            raise ProtocolAbort("round config: HE needs the statement key and the identity of every cohort member, "
                                "key holder included")
        return cls(params, flooding, kh, skey, bool(he.get("verify_aggregate", True)), ids)

    def envelope_max(self, dim: int) -> int:
        """Largest envelope (bytes) for ``dim`` values: one ciphertext per ``slots`` values + header."""
        chunks = -(-int(dim) // self.params.slots)
        return chunks * (self.params.max_ciphertext_bytes + 64) + 4096

    def verify_identity(self, domain: bytes, session_id: bytes, sid: int, blob: bytes, sig_b64: object,
                        what: str, context: bytes = b"") -> None:
        """``SecurityError`` unless ``sig_b64`` is secagg id ``sid``'s identity signature over ``blob``
        and this round's binding ``context`` (a site given another round config signs another one)."""
        from fedproxy_secure.artifacts.keys import verify_signature

        pub = self.identities.get(int(sid))
        sig = b64d(sig_b64, f"{what} signature", 64)
        if pub is None or not verify_signature(pub, sig, domain, signed_payload(session_id, sid, blob, context)):
            raise SecurityError(f"{what}: the signature does not verify under secagg id {sid}'s enrolled identity "
                                "and this round's config (a forged message, or that site was sent another round "
                                "config)")



def parse_statement(blob: bytes) -> dict:
    """The server's contribution statement as JSON (bounded size); ``SecurityError`` if malformed."""
    if len(blob) > STATEMENT_MAX:
        raise SecurityError("HE statement: too large")
    try:
        st = json.loads(blob)
        if not isinstance(st, dict) or not isinstance(st.get("contribution_sha256"), dict):
            raise ValueError("not an object with contribution_sha256")
        return st
    except ValueError as exc:
        raise SecurityError(f"HE statement: malformed ({exc})") from None
