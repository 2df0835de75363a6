"""HE (CKKS) secure aggregation: correctness, no secret key on the server, strict parsing, params."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
import tenseal as ts

from fedproxy_secure.errors import ConfigError, ProtocolAbort, SecurityError
from fedproxy_secure.secagg import DropoutPlan, make_summer
from fedproxy_secure.secagg.he import (
    CKKSSummer,
    ClientEncryptor,
    KeyHolder,
    PublicContext,
    ServerAggregatorHE,
)
from fedproxy_secure.secagg.he_params import validate_params

SID = b"federation-1/round-3"


def _vectors(n_clients: int, size: int, seed: int = 0, scale: float = 1.0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-scale, scale, size) for i in range(n_clients)}


@pytest.fixture(scope="module")
def setup():
    kh = KeyHolder()
    server = ServerAggregatorHE(kh.public_descriptor())
    kh.server_public_key = server.public_key_bytes()
    client = ClientEncryptor(kh.public_descriptor(), clip=10.0)
    return kh, server, client


def _round(kh, server, client, vecs, threshold, weights=None, sid=SID):
    n = next(iter(vecs.values())).size
    server.start_round(sid, n)
    for i, v in vecs.items():
        server.submit(i, client.encrypt(v, session_id=sid, client_id=i), (weights or {}).get(i, 1))
    agg, st, sig = server.finish(threshold)
    return agg, st, sig


# ---------------------------------------------------------------- correctness


def test_make_summer_he_defaults_sum_within_stated_tolerance():
    s = make_summer("he")
    assert isinstance(s, CKKSSummer) and s.mode == "he"
    vecs = _vectors(5, 5000, scale=2.0)  # spans two ciphertexts (4096 slots each)
    res = s.secure_sum(vecs, threshold=3, session_id=SID)
    ref = np.sum(list(vecs.values()), axis=0)
    tol = res.stats["tolerance"]
    assert tol < 1e-3  # stated: CKKS error + 7 sigma flooding + half grid, 5 clients
    assert res.total.shape == ref.shape
    assert np.max(np.abs(res.total - ref)) <= tol
    assert res.survivors == (0, 1, 2, 3, 4)
    assert res.stats["flood_sigma"] > 0
    # flooding actually perturbs: the output is not the raw CKKS decryption of the exact sum
    assert np.max(np.abs(res.total - ref)) > 0


def test_weighted_sum_by_integer_weights():
    s = CKKSSummer(clip=4.0)
    vecs = _vectors(3, 300, seed=2)
    w = {0: 1, 1: 3, 2: 7}
    res = s.secure_weighted_sum(vecs, w, threshold=2, session_id=SID)
    ref = sum(w[i] * vecs[i] for i in vecs)
    assert res.stats["weight_total"] == 11
    assert np.max(np.abs(res.total - ref)) <= res.stats["tolerance"]


def test_dropouts_contribute_nothing_and_abort_below_threshold():
    s = CKKSSummer()
    vecs = _vectors(5, 100, seed=3)
    plan = DropoutPlan({"share": frozenset({1}), "masked_input": frozenset({3})})
    res = s.secure_sum(vecs, threshold=3, session_id=SID, dropouts=plan)
    assert res.survivors == (0, 2, 4)
    ref = vecs[0] + vecs[2] + vecs[4]
    assert np.max(np.abs(res.total - ref)) <= res.stats["tolerance"]
    with pytest.raises(ProtocolAbort, match="threshold is 4"):
        s.secure_sum(vecs, threshold=4, session_id=SID, dropouts=plan)
    # the only key holder (client 0) drops before decryption -> abort
    with pytest.raises(ProtocolAbort, match="key holder"):
        s.secure_sum(vecs, threshold=2, session_id=SID, dropouts=DropoutPlan({"unmask": frozenset({0})}))


def test_symmetric_mode_and_rotation_per_round():
    s = CKKSSummer(encryption="symmetric", rotate="round")
    vecs = _vectors(3, 50, seed=4)
    r1 = s.secure_sum(vecs, threshold=3, session_id=b"r1")
    fp1 = s._keyholder.fingerprint
    r2 = s.secure_sum(vecs, threshold=3, session_id=b"r2")
    assert s._keyholder.fingerprint != fp1  # fresh keys every round
    ref = np.sum(list(vecs.values()), axis=0)
    for r in (r1, r2):
        assert np.max(np.abs(r.total - ref)) <= r.stats["tolerance"]


# ---------------------------------------------------------------- server holds no secret key


def test_server_has_no_secret_key(setup):
    kh, server, _ = setup
    assert server.has_secret_key is False
    blob = server.serialized_context()  # asks TenSEAL for the secret key too: there is none
    assert ts.context_from(blob).is_private() is False
    desc = msgpack.unpackb(kh.public_descriptor(), raw=False)
    assert ts.context_from(desc["ctx"]).is_private() is False
    # the secret export is large and private; the server refuses it as a descriptor
    secret = msgpack.unpackb(kh.export_secret_for_key_holder(), raw=False)
    assert ts.context_from(secret["ctx"]).is_private() is True
    desc["ctx"] = secret["ctx"]
    with pytest.raises(SecurityError, match="SECRET key"):
        ServerAggregatorHE(msgpack.packb(desc, use_bin_type=True))
    # and the server cannot decrypt: TenSEAL refuses on a public context
    v = ts.ckks_vector(server._ctx, [1.0, 2.0])
    with pytest.raises(Exception):
        v.decrypt()


def test_second_key_holder_from_shared_secret_decrypts(setup):
    kh, server, client = setup
    vecs = _vectors(3, 40, seed=5)
    agg, st, sig = _round(kh, server, client, vecs, 3)
    kh2 = KeyHolder.from_shared_secret(kh.export_secret_for_key_holder(), kh.params,
                                       server_public_key=server.public_key_bytes())
    assert kh2.fingerprint == kh.fingerprint
    out = kh2.decrypt_aggregate(agg, st, sig, session_id=SID, threshold=3)
    assert np.max(np.abs(out - sum(vecs.values()))) <= kh.flooding.tolerance(kh.params, 3)


# ---------------------------------------------------------------- strict parsing


def test_truncated_ciphertext_refused(setup):
    kh, server, client = setup
    env = client.encrypt(np.ones(10), session_id=SID, client_id=1)
    server.start_round(SID, 10)
    with pytest.raises(SecurityError, match="truncated"):
        server.submit(1, env[: len(env) // 2])
    # a well-formed envelope whose ciphertext bytes are truncated inside
    obj = msgpack.unpackb(env, raw=False)
    obj["cts"][0] = obj["cts"][0][:5000]
    with pytest.raises(SecurityError, match="truncated"):
        server.submit(1, msgpack.packb(obj, use_bin_type=True))
    # oversized ciphertext refused before parsing
    obj["cts"][0] = b"\0" * (kh.params.max_ciphertext_bytes + 1)
    with pytest.raises(SecurityError, match="max_bin_len|outside"):
        server.submit(1, msgpack.packb(obj, use_bin_type=True))


def test_foreign_context_ciphertext_refused(setup):
    kh, server, _ = setup
    other = KeyHolder()  # same parameters, different keys
    foreign = ClientEncryptor(other.public_descriptor()).encrypt(np.ones(10), session_id=SID, client_id=2)
    server.start_round(SID, 10)
    with pytest.raises(SecurityError, match="foreign HE context"):
        server.submit(2, foreign)
    # header relabelled to our fingerprint, ciphertext from other parameters -> parse/shape error
    small = KeyHolder(validate_params(4096, (40, 20, 40), 20))
    ct = ClientEncryptor(small.public_descriptor()).encrypt(np.ones(10), session_id=SID, client_id=2)
    obj = msgpack.unpackb(ct, raw=False)
    obj["ctx"] = kh.fingerprint
    with pytest.raises(SecurityError, match="other CKKS parameters|does not match the context"):
        server.submit(2, msgpack.packb(obj, use_bin_type=True))


def test_replay_duplicate_and_wrong_id_refused(setup):
    kh, server, client = setup
    env = client.encrypt(np.ones(10), session_id=b"old-round", client_id=1)
    server.start_round(SID, 10)
    with pytest.raises(SecurityError, match="another round"):
        server.submit(1, env)
    good = client.encrypt(np.ones(10), session_id=SID, client_id=1)
    with pytest.raises(SecurityError, match="header names client 1"):
        server.submit(2, good)
    server.submit(1, good)
    with pytest.raises(SecurityError, match="already contributed"):
        server.submit(1, good)
    with pytest.raises(ConfigError, match="clip"):
        client.encrypt(np.full(3, 11.0), session_id=SID, client_id=3)


# ---------------------------------------------------------------- key holder checks the statement


def test_keyholder_checks_signed_statement(setup):
    kh, server, client = setup
    vecs = _vectors(3, 20, seed=6)
    agg, st, sig = _round(kh, server, client, vecs, 2)
    with pytest.raises(ProtocolAbort, match="threshold is 4"):
        kh.decrypt_aggregate(agg, st, sig, session_id=SID, threshold=4)
    forged = json.loads(st)
    forged["contributors"] = [0, 1, 2, 3]
    forged["weights"]["3"] = 1
    forged["weight_total"] = 4
    with pytest.raises(SecurityError, match="bad signature"):
        kh.decrypt_aggregate(agg, json.dumps(forged).encode(), sig, session_id=SID, threshold=4)
    with pytest.raises(SecurityError, match="another round"):
        kh.decrypt_aggregate(agg, st, sig, session_id=b"other", threshold=2)
    other_agg, _, _ = _round(kh, server, client, {0: vecs[0]}, 1)
    with pytest.raises(SecurityError, match="digest"):
        kh.decrypt_aggregate(other_agg, st, sig, session_id=SID, threshold=2)
    with pytest.raises(SecurityError, match="not enrolled"):
        kh.decrypt_aggregate(agg, st, sig, session_id=SID, threshold=2, enrolled=frozenset({0, 1}))
    out = kh.decrypt_aggregate(agg, st, sig, session_id=SID, threshold=3)
    assert np.max(np.abs(out - sum(vecs.values()))) <= kh.flooding.tolerance(kh.params, 3)


def test_decryption_budget_forces_rotation():
    s = CKKSSummer(max_decryptions=1)
    vecs = _vectors(2, 10, seed=7)
    s.secure_sum(vecs, threshold=2, session_id=b"r1")
    with pytest.raises(SecurityError, match="rotate keys"):
        s.secure_sum(vecs, threshold=2, session_id=b"r2")


# ---------------------------------------------------------------- parameter validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": (60, 40, 40)}, "128-bit security"),
        ({"coeff_mod_bit_sizes": (60, 60, 60, 60)}, "128-bit security"),
        ({"poly_modulus_degree": 1000}, "poly_modulus_degree"),
        ({"coeff_mod_bit_sizes": (60,)}, "at least two primes"),
        ({"coeff_mod_bit_sizes": (70, 40)}, "20..60"),
        ({"scale_bits": 10}, "scale_bits"),
        ({"coeff_mod_bit_sizes": (40, 40), "scale_bits": 40}, "headroom"),
        ({"encryption": "none"}, "encryption"),
    ],
)
def test_unsafe_params_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CKKSSummer(**kwargs)


def test_precision_cannot_carry_magnitude_refused():
    with pytest.raises(ConfigError, match="exceeds the .* the parameters can carry"):
        CKKSSummer(clip=50_000.0).secure_sum(_vectors(3, 4), threshold=2, session_id=SID)
    with pytest.raises(ConfigError, match="tolerance"):
        CKKSSummer(tolerance=1e-7).secure_sum(_vectors(3, 4), threshold=2, session_id=SID)


def test_public_context_with_unsafe_params_refused(setup):
    kh, _, _ = setup
    desc = msgpack.unpackb(kh.public_descriptor(), raw=False)
    desc["params"]["coeff_mod_bit_sizes"] = [60, 60, 60, 60]
    with pytest.raises(ConfigError, match="128-bit security"):
        PublicContext.parse(msgpack.packb(desc, use_bin_type=True))
