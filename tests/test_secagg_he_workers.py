"""HE on every core (issue 28): worker processes encrypt and decrypt CKKS chunks with the same wire format.

The parallel path must be indistinguishable on the wire from the serial one: the same envelope
header, the same number of ciphertexts each passing the server's strict parser, the same values
after decryption; and the key holder's parallel decryption must equal its serial decryption
exactly (decryption is deterministic). Each test also checks that children really did the work,
so a silent fall-back to the serial path would fail it.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from fedproxy_secure.errors import SecurityError
from fedproxy_secure.secagg import he_workers
from fedproxy_secure.secagg.he import ClientEncryptor, FloodingPolicy, KeyHolder, ServerAggregatorHE

SID = b"he-workers/round-1"
N = 3 * 4096 + 123  # four ciphertexts: two shares of two chunks


@pytest.fixture(scope="module")
def pool():
    p = he_workers.shared_workers(2)
    yield p
    p.close()


@pytest.fixture(scope="module")
def keys():
    kh = KeyHolder(flooding=FloodingPolicy(enabled=False))  # rounding only: decryption output deterministic
    server = ServerAggregatorHE(kh.public_descriptor())
    kh.server_public_key = server.public_key_bytes()
    return kh, server


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, N)


def test_split_covers_every_chunk_once_in_order():
    for n in range(1, 12):
        for parts in range(1, 5):
            ranges = he_workers.split(n, parts)
            assert [i for a, b in ranges for i in range(a, b)] == list(range(n))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
    assert he_workers.shared_workers(1) is None  # one worker = the serial path, no child process


def test_parallel_envelope_has_the_serial_wire_format_and_values(keys, pool):
    kh, server = keys
    x = _x(0)
    before = pool.chunks_by_children
    serial = ClientEncryptor(kh.public_descriptor(), clip=1.0, workers=1).encrypt(x, session_id=SID, client_id=1)
    assert pool.chunks_by_children == before  # workers=1 never touches the pool
    parallel = ClientEncryptor(kh.public_descriptor(), clip=1.0, workers=2).encrypt(x, session_id=SID, client_id=2)
    assert pool.chunks_by_children == before + 2  # the second share (chunks 3 and 4) came from the child

    es, ep = msgpack.unpackb(serial, raw=False), msgpack.unpackb(parallel, raw=False)
    assert set(es) == set(ep) == {"v", "ctx", "sid", "cid", "n", "cts"}
    assert (es["v"], es["ctx"], es["sid"], es["n"]) == (ep["v"], ep["ctx"], ep["sid"], ep["n"])
    assert len(es["cts"]) == len(ep["cts"]) == 4
    # fresh randomness per ciphertext, but the same serialised layout: sizes within the compression jitter
    for a, b in zip(es["cts"], ep["cts"]):
        assert a != b and abs(len(a) - len(b)) <= 0.02 * len(a)

    server.start_round(SID, N)  # the strict parser accepts both, chunk by chunk
    server.submit(1, serial)
    server.submit(2, parallel)
    agg, st, sig = server.finish(2)
    total = kh.decrypt_aggregate(agg, st, sig, session_id=SID, threshold=2)
    assert np.abs(total - 2 * x).max() <= kh.flooding.tolerance(kh.params, 2)

    server.start_round(SID + b"/p", N)  # the parallel envelope alone decrypts to x, chunk order kept
    server.submit(2, ClientEncryptor(kh.public_descriptor(), clip=1.0, workers=2).encrypt(
        x, session_id=SID + b"/p", client_id=2))
    agg, st, sig = server.finish(1)
    alone = kh.decrypt_aggregate(agg, st, sig, session_id=SID + b"/p", threshold=1)
    assert np.abs(alone - x).max() <= kh.flooding.tolerance(kh.params, 1)


def test_parallel_decryption_equals_serial_decryption_exactly(keys, pool):
    kh, server = keys
    enc = ClientEncryptor(kh.public_descriptor(), clip=1.0, workers=1)
    server.start_round(SID + b"/d", N)
    for i in (1, 2, 3):
        server.submit(i, enc.encrypt(_x(i), session_id=SID + b"/d", client_id=i))
    agg, st, sig = server.finish(3)
    kh.workers = 1
    serial = kh.decrypt_aggregate(agg, st, sig, session_id=SID + b"/d", threshold=3)
    before = pool.chunks_by_children
    kh.workers = 2
    parallel = kh.decrypt_aggregate(agg, st, sig, session_id=SID + b"/d", threshold=3)
    kh.workers = None
    assert pool.chunks_by_children == before + 2
    assert np.array_equal(serial, parallel)
    assert np.abs(serial - sum(_x(i) for i in (1, 2, 3))).max() <= kh.flooding.tolerance(kh.params, 3)


def test_symmetric_key_holder_encrypts_in_parallel():
    from fedproxy_secure.secagg.he_params import validate_params

    kh = KeyHolder(validate_params(encryption="symmetric"), flooding=FloodingPolicy(enabled=False))
    server = ServerAggregatorHE(kh.public_descriptor())
    kh.server_public_key = server.public_key_bytes()
    kh.workers = 2
    x = _x(7)
    server.start_round(SID + b"/s", N)
    server.submit(1, kh.encryptor().encrypt(x, session_id=SID + b"/s", client_id=1))
    agg, st, sig = server.finish(1)
    assert np.abs(kh.decrypt_aggregate(agg, st, sig, session_id=SID + b"/s", threshold=1) - x).max() < 1e-5


def test_a_child_refuses_a_bad_ciphertext_like_the_serial_path(keys, pool):
    """A truncated ciphertext in the child's share is refused with the serial path's error."""
    kh, _ = keys
    blobs = [b for b in msgpack.unpackb(ClientEncryptor(kh.public_descriptor(), clip=1.0, workers=1).encrypt(
        _x(3), session_id=SID, client_id=1), raw=False)["cts"]]
    blobs[3] = blobs[3][:-200]  # truncated: in the child's share
    sizes = [4096, 4096, 4096, 123]
    secret = kh._ctx.serialize(save_secret_key=True)  # noqa: SLF001 - the key holder's own bytes
    with pytest.raises(SecurityError, match="cannot be parsed"):
        he_workers.decrypt_chunks(kh._ctx, blobs, sizes, kh.params, "HE aggregate")  # noqa: SLF001
    with pytest.raises(SecurityError, match="cannot be parsed"):
        pool.decrypt(kh._ctx, secret, kh.params, blobs, sizes, "HE aggregate")  # noqa: SLF001
    blobs[3] = blobs[0]  # intact but 4096 slots where 123 are declared: the shape check, in the child
    with pytest.raises(SecurityError, match="does not match the context"):
        pool.decrypt(kh._ctx, secret, kh.params, blobs, sizes, "HE aggregate")  # noqa: SLF001


def test_process_default_drives_the_in_process_summer(pool):
    """``set_default_workers`` (what ``client join`` sets from ``he_workers``) reaches the encryptors and
    the key holder the SDK builds itself."""
    import os

    from fedproxy_secure.secagg import make_summer

    assert he_workers.set_default_workers(None) == max(1, os.cpu_count() or 1)
    with pytest.raises(ValueError):
        he_workers.set_default_workers(0)
    he_workers.set_default_workers(2)
    try:
        p = he_workers.shared_workers(2)
        before = p.chunks_by_children
        vecs = {i: _x(10 + i) for i in range(3)}
        res = make_summer("he").secure_sum(vecs, threshold=2, session_id=SID + b"/summer")
        assert p.chunks_by_children >= before + 3 * 2 + 2  # 3 encryptions and 1 decryption, 2 chunks each
        assert np.abs(res.total - sum(vecs.values())).max() <= res.stats["tolerance"]
    finally:
        he_workers.set_default_workers(1)
