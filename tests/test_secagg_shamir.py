"""Shamir secret sharing over GF(2^521 - 1)."""

from __future__ import annotations

import itertools
import os

import pytest

from fedproxy_secure.errors import ProtocolAbort
from fedproxy_secure.secagg.shamir import PRIME, SHARE_BYTES, combine_shares, split_secret


@pytest.mark.parametrize("t,n", [(1, 1), (2, 2), (2, 3), (3, 5), (5, 9), (10, 20)])
def test_any_t_shares_reconstruct_full_32_byte_secret(t, n):
    secret = os.urandom(32)
    ids = [3 * i + 7 for i in range(n)]  # arbitrary positive ids as x-coordinates
    shares = split_secret(secret, t, ids)
    assert set(shares) == set(ids) and all(len(s) == SHARE_BYTES for s in shares.values())
    for subset in itertools.islice(itertools.combinations(ids, t), 30):
        assert combine_shares({i: shares[i] for i in subset}, t, 32) == secret
    assert combine_shares(shares, t, 32) == secret  # more than t is fine


def test_extreme_secrets_round_trip():
    for secret in (bytes(32), b"\xff" * 32, b"\x00" * 31 + b"\x01", b"\xff" * 65):
        shares = split_secret(secret, 3, [1, 2, 3, 4])
        assert combine_shares(shares, 3, len(secret)) == secret


def test_fewer_than_t_shares_refused_and_uninformative():
    secret = os.urandom(32)
    shares = split_secret(secret, 3, [1, 2, 3, 4, 5])
    with pytest.raises(ProtocolAbort):
        combine_shares({1: shares[1], 2: shares[2]}, 3, 32)
    # interpolating t-1 points as if t-1 were the threshold gives something unrelated to the secret
    with pytest.raises(ProtocolAbort):  # overwhelmingly a >32-byte field element
        combine_shares({1: shares[1], 2: shares[2]}, 2, 32)
    assert combine_shares({1: shares[1], 2: shares[2]}, 2, 66) != secret.rjust(66, b"\0")


def test_fresh_randomness_each_split():
    secret = os.urandom(32)
    a, b = split_secret(secret, 2, [1, 2]), split_secret(secret, 2, [1, 2])
    assert a[1] != b[1]


def test_bad_inputs():
    with pytest.raises(ValueError):
        split_secret(b"x", 0, [1, 2])
    with pytest.raises(ValueError):
        split_secret(b"x", 3, [1, 2])
    with pytest.raises(ValueError):
        split_secret(b"x", 2, [1, 1])
    with pytest.raises(ValueError):
        split_secret(b"x", 2, [0, 1])
    with pytest.raises(ValueError):
        split_secret(b"x" * 66, 2, [1, 2])
    shares = split_secret(b"y" * 32, 2, [1, 2])
    with pytest.raises(ProtocolAbort):
        combine_shares({1: shares[1], 2: shares[2][:-1]}, 2, 32)
    with pytest.raises(ProtocolAbort):
        combine_shares({1: shares[1], 2: (PRIME + 1).to_bytes(SHARE_BYTES, "big")}, 2, 32)
