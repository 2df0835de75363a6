"""HE (CKKS) secure aggregation as network stages, without sockets: server and client stage objects
driven in-process, and the round engine over a real SQLite store with a restart in the middle."""

from __future__ import annotations

import base64
import hashlib
import json

import msgpack
import numpy as np
import pytest
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedproxy_secure.artifacts.keys import sign
from fedproxy_secure.auditlog import canonical_json
from fedproxy_secure.errors import ConfigError, ProtocolAbort, SecurityError
from fedproxy_secure.secagg.he import FloodingPolicy, KeyHolder, PublicContext
from fedproxy_secure.secagg.he_params import validate_params
from fedproxy_secure.wire.codec import b64e, vec_from_b64
from fedproxy_secure.protocol.he_wire import (HE_STAGES, INPUT_DOMAIN, KEYS_DOMAIN, he_settings, key_holder_for,
                                              signed_payload)
from fedproxy_secure.protocol.modes.he import HEClientStages, HEServerStages

DIM = 8
SESSION = bytes(range(32))


def raw(pub) -> bytes:
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def setup_round(n=3, kh=1, verify=True, dim=DIM):
    ids = {i: Ed25519PrivateKey.generate() for i in range(1, n + 1)}
    skey = Ed25519PrivateKey.generate()
    he = he_settings({"verify_aggregate": verify}, 1.0)
    he.update(key_holder=kh, statement_key=b64e(raw(skey.public_key())))
    options = {"identities": {str(i): b64e(raw(k.public_key())) for i, k in ids.items()}, "he": he}
    rng = np.random.default_rng(0)
    vecs = {i: np.clip(0.1 * rng.standard_normal(dim), -1, 1) for i in ids}
    server = HEServerStages(cohort=list(ids), dim=dim, threshold=2, session_id=SESSION, clip_norm=1.0,
                                options=options, signing_key=skey)
    clients = {i: HEClientStages(vecs[i], sid=i, session_id=SESSION, threshold=2, dim=dim, clip_norm=1.0,
                                 cohort=list(ids), options=options, identity_key=ids[i]) for i in ids}
    return server, clients, vecs, ids, skey, options


def run(server, clients, drop=None, edit=None, stop_after=None):
    """Drive the stages; ``drop`` = {stage: {sids}} that send nothing, ``edit(stage, sid, msg) -> msg``."""
    drop = drop or {}
    out = {sid: {} for sid in clients}
    gone: set[int] = set()
    for stage in HE_STAGES:
        inputs = {}
        for sid in sorted(out):
            if sid in gone or sid in drop.get(stage, ()):
                gone.add(sid)
                continue
            msg = clients[sid].step(stage, out[sid])
            if edit:
                msg = edit(stage, sid, msg)
            inputs[sid] = json.loads(canonical_json(msg))  # the wire form
        out = server.close(stage, inputs)
        if stage == stop_after:
            return out
        if out is None:
            return server.result()
        gone |= set(inputs) - set(out)  # refused by the protocol: dropped
    raise AssertionError("no result")


def test_sum_within_stated_tolerance_and_server_has_no_secret_key():
    server, clients, vecs, *_ = setup_round()
    total, survivors = run(server, clients)
    assert survivors == (1, 2, 3)
    tol = FloodingPolicy(30, 100).tolerance(validate_params(), 3)
    assert tol < 1e-3
    err = np.max(np.abs(total - sum(vecs.values())))
    assert err <= tol, (err, tol)
    info = server.result_info()
    assert info["stated_tolerance"] == pytest.approx(tol) and info["contributors_sid"] == [1, 2, 3]
    # the server never held a secret key: every context it has, serialised with the secret key
    # requested, reloads as public
    assert not server.holds_secret_key
    for agg in (server.agg, server._scratch):
        ctx = ts.context_from(agg.serialized_context())
        assert not ctx.is_private() and not ctx.has_secret_key()
    # and the key holder's secret key really is different from anything the server has
    assert clients[1].keyholder._ctx.is_private()


def test_dropped_non_key_holder_is_excluded():
    server, clients, vecs, *_ = setup_round()
    total, survivors = run(server, clients, drop={"he_input": {3}})
    assert survivors == (1, 2)
    tol = server.result_info()["stated_tolerance"]
    assert np.max(np.abs(total - vecs[1] - vecs[2])) <= tol


def test_key_holder_rotates_over_the_cohort_and_non_first_holder_works():
    assert [key_holder_for(r, 3) for r in (1, 2, 3, 4)] == [1, 2, 3, 1]
    server, clients, vecs, *_ = setup_round(kh=2)
    assert clients[2].is_key_holder and clients[1].keyholder is None
    total, survivors = run(server, clients)
    assert survivors == (1, 2, 3)


@pytest.mark.parametrize("stage", HE_STAGES)
def test_key_holder_dropout_aborts_with_reason(stage):
    server, clients, *_ = setup_round()
    with pytest.raises(ProtocolAbort, match="key holder"):
        run(server, clients, drop={stage: {1}})


def test_below_threshold_aborts():
    server, clients, *_ = setup_round()
    with pytest.raises(ProtocolAbort, match="threshold"):
        run(server, clients, drop={"he_input": {2, 3}})


def _resign(ids, sid, env: bytes) -> dict:
    return {"type": "he_input", "sid": sid, "envelope": b64e(env),
            "signature": b64e(sign(ids[sid], INPUT_DOMAIN, signed_payload(SESSION, sid, env)))}


def _tamper(env: bytes) -> bytes:
    obj = msgpack.unpackb(env, raw=False)
    ct = bytearray(obj["cts"][0])
    ct[len(ct) // 2] ^= 0xFF
    obj["cts"][0] = bytes(ct)
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize("kind,reason", [
    ("flipped", "signature"), ("garbled", "ciphertext"), ("truncated", "truncated|cannot be parsed|not a valid"),
    ("foreign", "foreign HE context"), ("badsig", "signature"), ("otherid", "claims secagg id"),
])
def test_bad_envelope_is_refused_with_reason_and_round_continues(kind, reason):
    server, clients, vecs, ids, *_ = setup_round()
    foreign = KeyHolder().encryptor()

    def edit(stage, sid, msg):
        if stage != "he_input" or sid != 3:
            return msg
        env = base64.b64decode(msg["envelope"])
        if kind == "flipped":  # altered in transit: the client's identity signature no longer matches
            return {**msg, "envelope": b64e(_tamper(env))}
        if kind == "garbled":  # re-signed by its sender, but the ciphertext bytes are not a ciphertext
            obj = msgpack.unpackb(env, raw=False)
            obj["cts"][0] = obj["cts"][0][:100] + bytes(len(obj["cts"][0]) - 100)
            return _resign(ids, 3, msgpack.packb(obj, use_bin_type=True))
        if kind == "truncated":
            return _resign(ids, 3, env[: len(env) // 2])
        if kind == "foreign":
            return _resign(ids, 3, foreign.encrypt(vecs[3], session_id=SESSION, client_id=3))
        if kind == "badsig":
            return {**msg, "signature": b64e(sign(ids[2], INPUT_DOMAIN, signed_payload(SESSION, 3, env)))}
        return {**msg, "sid": 2}

    # at close: excluded with the reason recorded, the others complete
    total, survivors = run(server, clients, edit=edit)
    assert survivors == (1, 2) and 3 in server.rejections
    assert np.max(np.abs(total - vecs[1] - vecs[2])) <= server.result_info()["stated_tolerance"]
    # on arrival (before it is stored): refused with the same clear reason (HTTP 400 over the network)
    msg = edit("he_input", 3, clients[3].step("he_input", server._context_msg))
    with pytest.raises(SecurityError, match=reason):
        server.validate("he_input", json.loads(canonical_json(msg)), 3)


def _ctx_fields(server) -> dict:
    m = dict(server._context_msg)
    m.pop("type")
    return m


def test_descriptor_with_secret_key_or_wrong_signer_is_refused():
    server, clients, _, ids, *_ = setup_round()
    kh = clients[1].keyholder
    secret = msgpack.packb({"v": 1, "params": kh.params.to_json(), "key_id": kh.key_id,
                            "ctx": kh._ctx.serialize(save_secret_key=True)}, use_bin_type=True)
    msg = {"type": "he_keys", "sid": 1, "descriptor": b64e(secret),
           "signature": b64e(sign(ids[1], KEYS_DOMAIN, signed_payload(SESSION, 1, secret)))}
    with pytest.raises(SecurityError, match="SECRET"):
        server.validate("he_keys", msg, 1)
    # a descriptor signed by someone else than the key holder (e.g. the server substituting its own)
    evil = KeyHolder().public_descriptor()
    forged = {"type": "he_keys", "sid": 1, "descriptor": b64e(evil),
              "signature": b64e(sign(ids[2], KEYS_DOMAIN, signed_payload(SESSION, 1, evil)))}
    with pytest.raises(SecurityError, match="signature"):
        server.validate("he_keys", forged, 1)
    # a client refuses a context the key holder did not sign, even if the server relays it
    with pytest.raises(SecurityError, match="signature"):
        clients[2].step("he_input", {"type": "he_context", "key_holder": 1, "descriptor": forged["descriptor"],
                                     "signature": forged["signature"]})


def test_key_holder_refuses_an_aggregate_that_is_not_the_signed_sum():
    """A malicious server sends one client's ciphertext as the 'sum' with a statement it signs itself."""
    from fedproxy_secure.secagg.he import ServerAggregatorHE

    server, clients, vecs, ids, skey, _ = setup_round()
    out = run(server, clients, stop_after="he_input")
    msg = out[1]
    env2 = base64.b64decode(msg["contributions"]["2"]["envelope"])
    single = ServerAggregatorHE(clients[1].descriptor, signing_key=skey)
    single.start_round(SESSION, DIM)
    single.submit(2, env2)
    agg, _, _ = single.finish(1)
    st = json.loads(base64.b64decode(msg["statement"]))
    st["aggregate_sha256"] = hashlib.sha256(agg).hexdigest()
    forged = json.dumps(st, sort_keys=True, separators=(",", ":")).encode()
    bad = {**msg, "aggregate": b64e(agg), "statement": b64e(forged), "statement_signature": b64e(skey.sign(forged))}
    with pytest.raises(SecurityError, match="not the sum"):
        clients[1].step("he_decrypt", bad)
    # a statement listing a client that signed nothing is refused too
    st2 = json.loads(base64.b64decode(msg["statement"]))
    st2["contribution_sha256"]["3"] = "00" * 32
    f2 = json.dumps(st2, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(SecurityError, match="did not sign"):
        clients[1].step("he_decrypt", {**msg, "statement": b64e(f2), "statement_signature": b64e(skey.sign(f2))})
    # a statement not signed by the pinned server key is refused
    other = Ed25519PrivateKey.generate()
    raw_st = base64.b64decode(msg["statement"])
    with pytest.raises(SecurityError, match="bad signature"):
        clients[1].step("he_decrypt", {**msg, "statement_signature": b64e(other.sign(raw_st))})
    # the genuine message still decrypts
    plain = clients[1].step("he_decrypt", msg)
    total = vec_from_b64(plain["sum"], DIM)
    assert np.max(np.abs(total - sum(vecs.values()))) < 1e-3


def test_close_is_deterministic_for_replay():
    server, clients, _, ids, skey, options = setup_round()
    recorded: dict[str, dict] = {}

    def rec(stage, sid, msg):
        recorded.setdefault(stage, {})[sid] = json.loads(canonical_json(msg))
        return msg

    run(server, clients, edit=rec)
    outs = []
    for _ in range(2):
        s = HEServerStages(cohort=[1, 2, 3], dim=DIM, threshold=2, session_id=SESSION, clip_norm=1.0,
                               options=options, signing_key=skey)
        outs.append([canonical_json(s.close(st, recorded[st])) for st in HE_STAGES[:2]])
    assert outs[0] == outs[1]


def test_settings_refusals():
    for bad, msg in [({"flood": False}, "flood"), ({"encryption": "symmetric"}, "symmetric"),
                     ({"stat_security": 10}, "stat_security"), ({"bogus": 1}, "unknown"),
                     ({"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 60, 60, 60]}, "128-bit")]:
        with pytest.raises(ConfigError, match=msg):
            he_settings(bad, 1.0)
    with pytest.raises(ConfigError, match="clip"):
        he_settings({"max_clients": 1 << 20}, 1.0)
    from fedproxy_secure.protocol.settings import FederationSettings

    assert FederationSettings.from_dict({"mode": "he"}).mode == "he"
    with pytest.raises(ConfigError, match="federation.he"):
        FederationSettings.from_dict({"mode": "masking", "he": {"scale_bits": 40}})
    with pytest.raises(ConfigError, match="statement (signing )?key"):
        HEServerStages(cohort=[1, 2, 3], dim=DIM, threshold=2, session_id=SESSION, clip_norm=1.0,
                           options=setup_round()[5], signing_key=None)


def test_client_refuses_threshold_one_and_replayed_session():
    _, _, vecs, ids, _, options = setup_round()
    with pytest.raises(ProtocolAbort, match="threshold"):
        HEClientStages(vecs[1], sid=1, session_id=SESSION, threshold=1, dim=DIM, clip_norm=1.0, cohort=[1, 2, 3],
                       options=options, identity_key=ids[1])
    used = {SESSION}
    with pytest.raises(ProtocolAbort, match="replay"):
        HEClientStages(vecs[2], sid=2, session_id=SESSION, threshold=2, dim=DIM, clip_norm=1.0, cohort=[1, 2, 3],
                       options=options, identity_key=ids[2], used_sessions=used)


def test_round_engine_he_with_restart_and_no_secret_key_in_the_store(tmp_path):
    """RoundEngine over SQLite: join, he_keys, he_input, then a 'restart' (new engine, replay), he_decrypt."""
    from fedproxy_secure.auditlog import AuditLog
    from fedproxy_secure.client.stages import make_client_stages
    from fedproxy_secure.protocol.roundcfg import state_from_bytes
    from fedproxy_secure.protocol.settings import FederationSettings
    from fedproxy_secure.server.rounds import RoundEngine
    from fedproxy_secure.server.store import SQLiteStore

    settings = FederationSettings.from_dict({"rounds": 1, "min_clients": 3, "threshold": 2, "mode": "he", "dim": DIM})
    store, audit = SQLiteStore(tmp_path / "state.db"), AuditLog(tmp_path / "audit.jsonl")
    skey = Ed25519PrivateKey.generate()
    with pytest.raises(ConfigError, match="statement (signing )?key"):
        RoundEngine(store, audit, settings)
    keys = {}
    for name in ("a", "b", "c"):
        k = Ed25519PrivateKey.generate()
        cid, _ = store.enroll(store.add_token(name, 60), raw(k.public_key()))
        keys[cid] = k
    eng = RoundEngine(store, audit, settings, he_key=skey)
    eng.recover()
    rid = eng.current().round_id
    for cid in keys:
        eng.submit(cid, rid, "join", {"type": "join"})
    cfg = store.get_round(rid).config
    assert cfg["secagg_options"]["he"]["key_holder"] == 1 and eng.current().stage == "he_keys"
    cohort = {c: i for c, i in cfg["cohort"]}
    rng = np.random.default_rng(1)
    vecs = {c: np.clip(0.1 * rng.standard_normal(DIM), -1, 1) for c in keys}
    stages = {c: make_client_stages(cfg, vecs[c], cohort[c], identity_key=keys[c]) for c in keys}
    for stage in HE_STAGES:
        for c in keys:
            st, msg = eng.fetch(c, rid, stage)
            assert st == "ready", (stage, st, msg)
            eng.submit(c, rid, stage, stages[c].step(stage, msg))
        if stage == "he_input":  # server restart: a fresh engine replays he_keys and he_input from the store
            eng = RoundEngine(store, audit, settings, he_key=skey)
            eng.recover()
            assert eng.current().stage == "he_decrypt"
    row = store.get_round(rid)
    assert row.status == "done", row.reason
    total = np.frombuffer(base64.b64decode(row.result["sum_b64"]), "<f8")
    assert np.max(np.abs(total - sum(vecs.values()))) <= row.result["he"]["stated_tolerance"]
    assert row.result["he"]["key_holder"] == [c for c, i in cohort.items() if i == 1][0]
    np.testing.assert_allclose(state_from_bytes(store.global_state()[1])["theta"], total / 3)
    # nothing the server stored carries a CKKS secret key: every descriptor parses as public
    seen = 0
    for stage in HE_STAGES + tuple("out:" + s for s in HE_STAGES):
        for body in store.submissions(rid, stage).values():
            msg = json.loads(body)
            if "descriptor" in msg:
                pc = PublicContext.parse(base64.b64decode(msg["descriptor"]))
                assert not ts.context_from(pc.context_bytes).is_private()
                seen += 1
    assert seen == 4  # the key holder's he_keys and three he_context messages


def test_audit_check_accepts_network_he_and_reports_its_controls():
    from fedproxy_secure.audit.check import deployment_from_network
    from fedproxy_secure.audit.controls import evaluate

    cfg = {"clients": 4, "dp": {"enabled": True, "epsilon": 4.0, "delta": 1e-5},
           "federation": {"rounds": 2, "min_clients": 4, "threshold": 3, "mode": "he", "dim": 64, "clip_norm": 1.0,
                          "he": {"stat_security": 40}}}
    dep, _ = deployment_from_network(cfg, "net.yaml")
    found = {f.control: f.status for f in evaluate(dep)}
    assert dep.mode == "he" and dep.effective_threshold == 3 and dep.he_flood is True
    assert found["secagg.mode"] == "PASS" and found["he.flooding"] == "PASS" and found["he.shared_key"] == "WARN"
    assert found["secagg.threshold"] == "PASS"
    with pytest.raises(ConfigError, match="flood"):
        deployment_from_network({**cfg, "federation": {**cfg["federation"], "he": {"flood": False}}}, "net.yaml")
