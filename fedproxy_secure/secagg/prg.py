"""Key derivation and mask expansion for masking mode.

Every symmetric key is derived with HKDF-SHA256 whose ``salt`` is the session id (which binds the
federation and round) and whose ``info`` is a domain-separated label plus the party ids, so a key
is never reused across rounds, purposes or pairs. Masks are the ChaCha20 keystream (256-bit key,
zero counter/nonce: each key is used for exactly one stream) read as little-endian ``uint64``.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DOMAIN = b"fedproxy-secure/v1/"
INFO_PAIRWISE_MASK = DOMAIN + b"pairwise-mask"
INFO_SELF_MASK = DOMAIN + b"self-mask"
INFO_SHARE_AEAD = DOMAIN + b"share-transport"
INFO_GRAPH = DOMAIN + b"secagg-plus-graph"
_NONCE = bytes(16)


def hkdf(ikm: bytes, session_id: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256(ikm, salt=session_id, info) -> ``length`` bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=session_id, info=info).derive(ikm)


def ids_info(label: bytes, *ids: int) -> bytes:
    """``label`` followed by the ids as 8-byte big-endian ints (fixed width, unambiguous)."""
    return label + b"".join(int(i).to_bytes(8, "big") for i in ids)


def pairwise_key(shared_secret: bytes, session_id: bytes, a: int, b: int) -> bytes:
    """Mask key of the pair {a, b}: identical for both parties (ids are ordered)."""
    lo, hi = sorted((a, b))
    return hkdf(shared_secret, session_id, ids_info(INFO_PAIRWISE_MASK, lo, hi))


def self_mask_key(seed: bytes, session_id: bytes, client_id: int) -> bytes:
    """Key of client ``client_id``'s self mask, from its 32-byte seed."""
    return hkdf(seed, session_id, ids_info(INFO_SELF_MASK, client_id))


class MaskExpander:
    """Expands 32-byte keys into ``uint64`` masks of a fixed length, reusing one scratch buffer."""

    def __init__(self, length: int) -> None:
        self.length = int(length)
        self._zeros = bytes(8 * self.length)
        self._buf = bytearray(8 * self.length + 64)

    def view(self, key: bytes) -> np.ndarray:
        """The mask for ``key`` as a view on the scratch buffer (valid until the next call)."""
        if len(key) != 32:
            raise ValueError("prg: mask key must be 32 bytes")
        enc = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
        enc.update_into(self._zeros, self._buf)
        return np.frombuffer(self._buf, dtype=np.uint64, count=self.length)

    def add_into(self, acc: np.ndarray, key: bytes, sign: int) -> None:
        """``acc += sign * PRG(key)`` modulo 2^64, in place (``sign`` is +1 or -1)."""
        m = self.view(key)
        if sign > 0:
            np.add(acc, m, out=acc)
        else:
            np.subtract(acc, m, out=acc)


def expand(key: bytes, length: int) -> np.ndarray:
    """A fresh copy of the ``length``-element ``uint64`` mask of ``key``."""
    return MaskExpander(length).view(key).copy()
