"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

The field is large enough that a full 32-byte secret (an X25519 private key or a 256-bit mask seed)
is one field element: secrets are never truncated or split. Share x-coordinates are the holders'
client ids (positive ints), so a share is just the 66-byte big-endian y-coordinate.

Guarantees: any ``threshold`` distinct shares reconstruct the secret exactly; any ``threshold - 1``
shares are independent of it (the polynomial coefficients come from :mod:`secrets`).
"""

from __future__ import annotations

import secrets
from typing import Iterable, Mapping

from fedproxy_secure.errors import ProtocolAbort

PRIME = (1 << 521) - 1  # Mersenne prime M521
SHARE_BYTES = 66  # ceil(521 / 8)
MAX_SECRET_BYTES = 65  # any 65-byte string is < PRIME


def _check_ids(ids: Iterable[int]) -> list[int]:
    out = list(ids)
    if len(set(out)) != len(out):
        raise ValueError("shamir: share holder ids must be distinct")
    for x in out:
        if not isinstance(x, int) or isinstance(x, bool) or not (0 < x < PRIME):
            raise ValueError(f"shamir: holder id {x!r} must be a positive int below the field prime")
    return out


def split_secret(secret: bytes, threshold: int, holders: Iterable[int]) -> dict[int, bytes]:
    """Split ``secret`` into one share per holder id; any ``threshold`` of them reconstruct it.

    Raises ``ValueError`` if the threshold is not in ``[1, len(holders)]`` or the secret is too long.
    """
    ids = _check_ids(holders)
    if not 1 <= threshold <= len(ids):
        raise ValueError(f"shamir: threshold {threshold} must be between 1 and {len(ids)} holders")
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"shamir: secret of {len(secret)} bytes exceeds {MAX_SECRET_BYTES}")
    coeffs = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    shares: dict[int, bytes] = {}
    for x in ids:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine_shares(shares: Mapping[int, bytes], threshold: int, secret_len: int) -> bytes:
    """Reconstruct a ``secret_len``-byte secret from at least ``threshold`` shares (id -> share).

    Uses exactly ``threshold`` shares (lowest ids). Raises ``ProtocolAbort`` if there are too few
    shares, a share is malformed, or the result does not fit ``secret_len`` bytes (a sign of
    corrupted shares).
    """
    if len(shares) < threshold:
        raise ProtocolAbort(f"shamir: {len(shares)} shares received, {threshold} needed")
    ids = _check_ids(sorted(shares))[:threshold]
    ys = []
    for x in ids:
        s = shares[x]
        if not isinstance(s, (bytes, bytearray)) or len(s) != SHARE_BYTES:
            raise ProtocolAbort(f"shamir: share from holder {x} is not {SHARE_BYTES} bytes")
        y = int.from_bytes(s, "big")
        if y >= PRIME:
            raise ProtocolAbort(f"shamir: share from holder {x} is not a field element")
        ys.append(y)
    secret = 0
    for j, (xj, yj) in enumerate(zip(ids, ys)):
        num, den = 1, 1
        for m, xm in enumerate(ids):
            if m != j:
                num = num * xm % PRIME  # (0 - xm) / (xj - xm) == xm / (xm - xj)
                den = den * (xm - xj) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * secret_len):
        raise ProtocolAbort("shamir: reconstructed value does not fit the secret length (bad shares)")
    return secret.to_bytes(secret_len, "big")
