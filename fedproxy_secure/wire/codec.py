"""The one wire codec for bytes and vectors: standard base64, URL-safe base64, float64 vectors.

Every party encodes binary fields with :func:`b64e` and decodes them with :func:`b64d`, which checks
the type and the length *before* decoding (so a hostile message cannot make a party allocate more
than ``max_bytes``) and refuses non-canonical alphabets. Vectors travel as little-endian float64
(:func:`vec_to_b64` / :func:`vec_from_b64`) or as little-endian uint64 ring elements
(:func:`u64_to_b64` / :func:`u64_from_b64`). Request headers use unpadded URL-safe base64
(:func:`b64u` / :func:`b64u_decode`). Decoding failures raise ``ProtocolAbort`` naming the field.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from fedproxy_secure.errors import ProtocolAbort

__all__ = ["b64e", "b64d", "b64u", "b64u_decode", "vec_to_b64", "vec_from_b64", "u64_to_b64", "u64_from_b64",
           "DEFAULT_MAX_BYTES"]

#: the largest field a message may carry unless the caller names a tighter bound (16 GiB)
DEFAULT_MAX_BYTES = 1 << 34


def b64e(b: bytes) -> str:
    """Standard (padded) base64 text of ``b``."""
    return base64.b64encode(bytes(b)).decode("ascii")


def b64d(s: object, what: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Decode standard base64 text of at most ``max_bytes`` bytes.

    Guarantees: ``s`` is a ``str``; its length is checked against ``max_bytes`` before decoding;
    only the standard alphabet with correct padding is accepted. Raises ``ProtocolAbort`` naming
    ``what`` otherwise.
    """
    if not isinstance(s, str):
        raise ProtocolAbort(f"{what}: expected a base64 string")
    if len(s) > 4 * ((max_bytes + 2) // 3):
        raise ProtocolAbort(f"{what}: {len(s)} base64 characters exceed the {max_bytes}-byte limit")
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ProtocolAbort(f"{what}: invalid base64") from None


def b64u(data: bytes) -> str:
    """URL-safe base64 without padding (request headers)."""
    return base64.urlsafe_b64encode(bytes(data)).rstrip(b"=").decode("ascii")


def b64u_decode(text: str) -> bytes:
    """Inverse of :func:`b64u`; raises ``ValueError`` on bad input (the caller maps it to a refusal)."""
    if not isinstance(text, str):
        raise ValueError("expected URL-safe base64 text")
    pad = "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(text + pad)


def vec_to_b64(v: np.ndarray) -> str:
    """float64 little-endian bytes of ``v`` as base64."""
    return b64e(np.ascontiguousarray(v, dtype="<f8").tobytes())


def vec_from_b64(s: object, dim: int, what: str = "vector") -> np.ndarray:
    """Inverse of :func:`vec_to_b64`: exactly ``dim`` finite float64 values, else ``ProtocolAbort``."""
    raw = b64d(s, what, 8 * int(dim))
    if len(raw) != 8 * dim:
        raise ProtocolAbort(f"{what}: {len(raw) // 8} values, expected {dim}")
    v = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    if not np.all(np.isfinite(v)):
        raise ProtocolAbort(f"{what}: non-finite values")
    return v


def u64_to_b64(v: np.ndarray) -> str:
    """uint64 little-endian bytes of ``v`` (ring elements of masked inputs) as base64."""
    return b64e(np.ascontiguousarray(v, dtype="<u8").tobytes())


def u64_from_b64(s: object, what: str = "vector", max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Inverse of :func:`u64_to_b64`; ``ProtocolAbort`` unless a whole number of uint64 values."""
    raw = b64d(s, what, max_bytes)
    if len(raw) % 8:
        raise ProtocolAbort(f"{what}: {len(raw)} bytes is not a whole number of uint64 values")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)
