"""HE (CKKS) secure aggregation over the real socket: a server process and client processes on
loopback mTLS in ``he`` mode.

Checks the aggregate equals the plaintext sum within the stated CKKS + flooding tolerance, the key
holder rotates, the server stores no CKKS secret key; a dropped non-key-holder is excluded and the
round completes; tampered / garbled / foreign envelopes are refused with a clear HTTP 400 reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import time

import msgpack
import numpy as np
import tenseal as ts

from fedproxy_secure.auditlog import verify_log
from fedproxy_secure.secagg.he import PublicContext
from tests.net_helpers import (db_rounds, expected_sum, make_server, result_sum, roster_policy, start_client,
                               start_server, stop,
                               wait_for)

HE_DEADLINES = {"join": 20, "he_keys": 20, "he_input": 6, "he_decrypt": 20}


def _keys_by_sid(tmp, n):
    """Pre-make the clients' identity keys so the test knows each site's secagg id (sorted client ids)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from fedproxy_secure.artifacts.keys import generate_key, save_private_key

    keys = [generate_key() for _ in range(n)]
    cid = [("c-" + hashlib.sha256(k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16], k)
           for k in keys]
    cid.sort(key=lambda x: x[0])
    for i, (_, k) in enumerate(cid):  # site i gets secagg id i + 1 in every full cohort
        (tmp / f"client{i}").mkdir()
        save_private_key(k, tmp / f"client{i}" / "identity.key")
    return [c for c, _ in cid]


def _stored_descriptors(d):
    con = sqlite3.connect(f"file:{d / 'state.db'}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT stage, body FROM submissions").fetchall()
    finally:
        con.close()
    return [base64.b64decode(m["descriptor"]) for _, b in rows
            for m in [json.loads(b)] if isinstance(m, dict) and "descriptor" in m]


def test_three_clients_he_sum_within_tolerance_and_no_secret_key_on_server(tmp_path):
    d, port = make_server(tmp_path, 3, mode="he", rounds=2, deadlines=HE_DEADLINES)
    srv = start_server(d, port)
    try:
        pol = ["--policy", str(roster_policy(tmp_path, 3))]  # HE needs a roster (fingerprints exchanged out of band)
        clients = [start_client(d, i, tmp_path, extra=pol) for i in range(3)]
        for c in clients:
            c.wait(90)
            assert c.returncode == 0
        rounds = db_rounds(d)
        assert [r[1] for r in rounds] == ["done", "done"], rounds
        holders = []
        for rid, _, _, res in rounds:
            r = json.loads(res)
            assert len(r["survivors"]) == 3
            tol = r["he"]["stated_tolerance"]
            assert 0 < tol < 1e-3
            err = np.max(np.abs(result_sum(res) - expected_sum(range(3), rid, 8)))
            assert err <= tol, (err, tol)
            assert err > 0  # flooded and rounded, not the exact plaintext sum
            holders.append(r["he"]["key_holder"])
        assert holders[0] != holders[1]  # the key holder rotates over the cohort
        for i in range(3):
            assert json.loads((tmp_path / f"client{i}.json").read_text())["rounds_done"] == [1, 2]
    finally:
        stop(srv)
    # the server holds no CKKS secret key: every descriptor it stored is public (and one per round)
    descs = _stored_descriptors(d)  # he_keys submissions and he_context outbox messages
    assert len(descs) == 8 and len(set(descs)) == 2  # fresh keys each round, relayed unchanged
    for raw in set(descs):
        pc = PublicContext.parse(raw)  # refuses a descriptor with a secret key
        assert not ts.context_from(pc.context_bytes).is_private()
    # its key folder holds only Ed25519 signing keys (operator + HE statement) and the audit-log MAC secret,
    # no CKKS context
    assert sorted(p.name for p in (d / "keys").iterdir()) == ["audit.secret", "he_statement.key", "operator.key",
                                                              "operator.pub"]
    for p in (d / "keys").iterdir():
        assert p.stat().st_size < 1024
    assert verify_log(d / "audit.jsonl").ok


def _tamperer(d, tmp, site: int, log: list):
    """Site ``site`` joins round 1 in this process and posts bad envelopes; each must be refused (400)."""
    from fedproxy_secure.artifacts.keys import sign
    from fedproxy_secure.client.join import ClientSession
    from fedproxy_secure.client.stages import make_client_stages
    from fedproxy_secure.secagg.he import KeyHolder
    from fedproxy_secure.wire.codec import b64e
    from fedproxy_secure.protocol.he_wire import INPUT_DOMAIN, signed_payload
    from fedproxy_secure.wire.binding import round_config_digest
    from fedproxy_secure.protocol.roundcfg import verify_round_config

    s = ClientSession(d / "enrol" / f"site{site}", tmp / f"client{site}", retry_s=20)
    try:
        s.enroll()
        wait_for(lambda: s.federation()["stage"] == "join", 30, "round 1 join")
        assert s.http.post_json("/v1/round/1/join", {"type": "join"}, round_id=1).status == 200
        cfg = verify_round_config(s.operator, s._poll(1, "config", time.monotonic() + 60))
        sid = dict((c, i) for c, i in cfg["cohort"])[s.client_id]
        session = bytes.fromhex(cfg["session_id"])
        st = make_client_stages(cfg, np.full(8, 0.1), sid, identity_key=s.key)
        r = s.http.post_json("/v1/round/1/he_keys", st.step("he_keys", s._poll(1, "he_keys", time.monotonic() + 60)),
                             round_id=1)
        assert r.status == 200, r.content
        good = st.step("he_input", s._poll(1, "he_input", time.monotonic() + 60))
        env = base64.b64decode(good["envelope"])

        def resigned(e: bytes) -> dict:
            return {**good, "envelope": b64e(e),
                    "signature": b64e(sign(s.key, INPUT_DOMAIN, signed_payload(session, sid, e, round_config_digest(cfg))))}

        obj = msgpack.unpackb(env, raw=False)
        flipped = dict(obj, cts=[obj["cts"][0][:200] + bytes([obj["cts"][0][200] ^ 1]) + obj["cts"][0][201:]])
        garbled = dict(obj, cts=[obj["cts"][0][:100] + bytes(len(obj["cts"][0]) - 100)])
        foreign = KeyHolder().encryptor().encrypt(np.full(8, 0.1), session_id=session, client_id=sid)
        cases = [("in transit", {**good, "envelope": b64e(msgpack.packb(flipped, use_bin_type=True))}, "signature"),
                 ("garbled", resigned(msgpack.packb(garbled, use_bin_type=True)), "ciphertext"),
                 ("truncated", resigned(env[: len(env) // 3]), "truncated"),
                 ("foreign", resigned(foreign), "foreign HE context")]
        for name, msg, why in cases:
            r = s.http.post_json("/v1/round/1/he_input", msg, round_id=1)
            log.append((name, r.status, r.json().get("error", "")))
            assert r.status == 400 and why in r.json()["error"], (name, r.status, r.content[:300])
    finally:
        s.close()


def test_dropped_non_key_holder_and_tampered_envelope_round_still_completes(tmp_path):
    cids = _keys_by_sid(tmp_path, 4)
    d, port = make_server(tmp_path, 4, mode="he", rounds=1, min_clients=4, threshold=2, deadlines=HE_DEADLINES)
    srv = start_server(d, port)
    procs = []
    try:
        # site0 = secagg id 1 = round 1's key holder; site2 dies before he_input; site3 tampers (this process)
        pol = ["--policy", str(roster_policy(tmp_path, 4))]  # the in-process tamperer (site3) is rostered too
        procs = [start_client(d, 0, tmp_path, extra=pol), start_client(d, 1, tmp_path, extra=pol),
                 start_client(d, 2, tmp_path, die_at="1:he_input", extra=pol)]
        log: list = []
        _tamperer(d, tmp_path, 3, log)
        procs[2].wait(60)
        assert procs[2].returncode == 17  # crashed before sending its envelope
        for p in procs[:2]:
            p.wait(90)
            assert p.returncode == 0
        rounds = db_rounds(d)
        assert [r[1] for r in rounds] == ["done"], rounds
        res = json.loads(rounds[0][3])
        assert res["survivors"] == cids[:2] and res["he"]["key_holder"] == cids[0]
        err = np.max(np.abs(result_sum(rounds[0][3]) - expected_sum([0, 1], 1, 8)))
        assert err <= res["he"]["stated_tolerance"], err
        assert [x[0] for x in log] == ["in transit", "garbled", "truncated", "foreign"]
    finally:
        stop(srv)
        for p in procs:
            stop(p)
    assert verify_log(d / "audit.jsonl").ok
    events = [json.loads(x) for x in (d / "audit.jsonl").read_text().splitlines()]
    dropped = {e["data"]["client"] for e in events if e["event"] == "dropout" and e["data"]["stage"] == "he_input"}
    assert dropped == {cids[2], cids[3]}
    rejects = [e["data"]["reason"] for e in events if e["event"] == "reject" and e["data"].get("client") == cids[3]]
    assert len(rejects) == 4 and any("foreign HE context" in r for r in rejects)
