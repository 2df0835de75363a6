"""T14: masks come from 256-bit keys and seeds; a shorter key is refused and every key bit matters.

A Flower-style 32-bit seed (the 32-byte secret XOR-folded to 4 bytes for a Mersenne Twister) would
fail each test here: the key lengths are asserted, a shortened key is refused by the mask PRG, keys
that agree on a 32-bit fold or a 32-bit prefix give unrelated masks, and the self-mask seed the
server reconstructs from the revealed Shamir shares is 32 bytes of fresh randomness that, expanded,
removes exactly the mask the client added.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedproxy_secure.secagg.masking import KEY_BYTES, derive_session_id
from fedproxy_secure.secagg.prg import MaskExpander, expand, hkdf, pairwise_key, self_mask_key
from fedproxy_secure.secagg.shamir import combine_shares
from tests.threat_helpers import run_masking_session

WORDS = 64  # 4096 mask bits per comparison


def _bit_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of differing bits between two uint64 vectors."""
    x = np.bitwise_xor(a, b).view(np.uint8)
    return float(np.unpackbits(x).mean())


def _flip(key: bytes, *bits: int) -> bytes:
    k = bytearray(key)
    for b in bits:
        k[b // 8] ^= 1 << (b % 8)
    return bytes(k)


def _fold32(key: bytes) -> bytes:
    """Flower's fold: XOR of the key's eight 32-bit words."""
    w = np.frombuffer(key, dtype="<u4")
    return int(np.bitwise_xor.reduce(w)).to_bytes(4, "little")


def test_keys_and_seeds_are_256_bit():
    sid = derive_session_id("fed", 1)
    assert KEY_BYTES == 32 and len(sid) == 32
    assert len(hkdf(os.urandom(32), sid, b"x")) == 32
    assert len(pairwise_key(os.urandom(32), sid, 1, 2)) == 32
    assert len(self_mask_key(os.urandom(32), sid, 1)) == 32


@pytest.mark.parametrize("length", [4, 8, 16, 31, 33, 64])
def test_shortened_or_padded_mask_key_is_refused(length):
    with pytest.raises(ValueError, match="32 bytes"):
        MaskExpander(WORDS).view(os.urandom(length))
    with pytest.raises(ValueError, match="32 bytes"):
        expand(os.urandom(length), WORDS)


def test_every_key_bit_changes_the_mask():
    """Flipping any one of the 256 key bits changes about half the mask bits (no bit is ignored)."""
    key = os.urandom(32)
    base = expand(key, WORDS)
    d = [_bit_distance(base, expand(_flip(key, b), WORDS)) for b in range(256)]
    assert min(d) > 0.4 and max(d) < 0.6, (min(d), max(d))


def test_keys_equal_under_a_32_bit_fold_or_prefix_give_unrelated_masks():
    key = os.urandom(32)
    twin = _flip(key, 3, 3 + 32)  # same bit in words 0 and 1: the XOR fold is unchanged
    assert _fold32(twin) == _fold32(key) and twin != key
    same_prefix = key[:4] + os.urandom(28)  # same first 32 bits
    for other in (twin, same_prefix):
        assert 0.4 < _bit_distance(expand(key, WORDS), expand(other, WORDS)) < 0.6


def test_self_mask_seed_recovered_from_shares_is_a_fresh_32_byte_secret():
    """Reconstruct every client's self-mask seed from the b-shares revealed in the unmasking round:
    each is 32 bytes, all differ (fresh per client and session, bytes beyond the first 4 vary), and
    together with the pairwise masks (which cancel) they explain the masked inputs exactly."""
    rng = np.random.default_rng(7)
    dim = 256
    seeds: list[bytes] = []
    for _ in range(3):
        xs = {i: rng.uniform(-1, 1, dim) for i in (1, 2, 3)}
        tr = run_masking_session(xs, threshold=2)
        shares: dict[int, dict[int, bytes]] = {u: {} for u in xs}
        for holder, resp in tr.unmask.items():
            assert resp.key_shares == ()  # nobody dropped: no mask-key share is revealed
            for s in resp.self_mask_shares:
                shares[s.owner_id][holder] = s.share
        residual = np.zeros(dim, dtype=np.uint64)
        for u, x in xs.items():
            seed = combine_shares(shares[u], 2, KEY_BYTES)
            assert len(seed) == 32
            seeds.append(seed)
            # masked - encode(x) - self mask = this client's pairwise masks; they sum to 0 mod 2^64
            residual += tr.masked[u] - tr.config.encoder.encode(x) - expand(self_mask_key(seed, tr.session_id, u), dim)
        assert not residual.any()
    assert len(set(seeds)) == len(seeds) == 9
    tails = np.array([list(s[4:]) for s in seeds], dtype=np.uint8)
    assert all(len(set(tails[:, j])) > 1 for j in range(28))  # no constant (e.g. zero-padded) byte
