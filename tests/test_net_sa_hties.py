"""SA-H-TIES over the real socket: a server process and client processes on loopback mTLS, masking.

The new global state equals SA-H-TIES computed in-process over plain sums of the same (synthetic,
seeded) client updates; a client that dies in phase B is dropped and the round still completes
(its phase-A contribution stays in T, C and K); a server SIGKILLed between the phases resumes by
replay and the round completes with nothing lost.
"""

from __future__ import annotations

import json
import signal
import sqlite3

import numpy as np

from fedproxy_secure.aggregate import AggState, make_aggregator
from fedproxy_secure.auditlog import verify_log
from fedproxy_secure.client.join import clip_update, synthetic_train_fn
from fedproxy_secure.protocol.roundcfg import state_from_bytes
from fedproxy_secure.protocol.sa_hties_wire import SAHTiesOptions, reference_step
from tests.net_helpers import db_rounds, make_server, start_client, start_server, stop, wait_for

DIM = 16
FAST = {"join": 20, "advertise": 20, "share": 6, "masked_input": 6, "consistency": 6, "unmask": 6, "sa_reveal": 6}


def update(seed: int, rid: int) -> np.ndarray:
    return clip_update(synthetic_train_fn(seed, 0.1)(np.zeros(DIM), {"round_id": rid})[0], 1.0)


def client_id(tmp, i: int) -> str:
    return json.loads((tmp / f"client{i}" / "enrolment.json").read_text())["client_id"]


def theta(d, rid: int) -> dict:
    con = sqlite3.connect(f"file:{d / 'state.db'}?mode=ro", uri=True)
    try:
        return state_from_bytes(con.execute("SELECT blob FROM global_state WHERE round_id=?", (rid,)).fetchone()[0])
    finally:
        con.close()


def events(d) -> list[dict]:
    return [json.loads(x) for x in (d / "audit.jsonl").read_text().splitlines()]


def test_sa_hties_over_masking_equals_in_process_and_survives_a_phase_b_dropout(tmp_path):
    d, port = make_server(tmp_path, 4, rounds=2, min_clients=4, dim=DIM, aggregator="sa_hties", deadlines=FAST)
    srv = start_server(d, port)
    try:
        pol = tmp_path / "policy.yaml"  # h_norm reveal (the default) sends h_i in the clear: the sites opt in
        pol.write_text("allow_h_reveal: true\n")
        victim = start_client(d, 3, tmp_path, die_at="2:b_masked_input", extra=["--policy", str(pol)])
        others = [start_client(d, i, tmp_path, extra=["--policy", str(pol)]) for i in range(3)]
        for c in others:
            c.wait(90)
            assert c.returncode == 0
        victim.wait(30)
        assert victim.returncode == 17  # died in round 2 after phase A, the reveal and two phase-B stages
        rounds = db_rounds(d)
        assert [r[1] for r in rounds] == ["done", "done"], rounds
        seed_of = {client_id(tmp_path, i): i for i in range(4)}
        # round 1: everyone in both phases = SA-H-TIES in-process over the same updates
        ups1 = [update(seed_of[c], 1) for c in sorted(seed_of)]
        ref1 = make_aggregator("sa_hties").aggregate(ups1, [1] * 4, AggState())
        s1 = theta(d, 1)
        np.testing.assert_allclose(s1["theta"], ref1.delta, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(s1["conflict"], ref1.conflict, atol=1e-8)
        assert np.linalg.norm(ref1.delta) > 0.05
        # round 2: the victim is in phase A (T, sign sum, K = 4, h range) but not in the phase-B sums
        r2 = json.loads(rounds[1][3])
        cohort = {c: i + 1 for i, c in enumerate(sorted(seed_of))}  # secagg ids: sorted client ids
        vid = client_id(tmp_path, 3)
        assert vid in r2["sa_hties"]["phase_a_survivors"] and vid not in r2["survivors"]
        assert len(r2["survivors"]) == 3 and r2["sa_hties"]["K"] == 4
        ups2 = {cohort[c]: update(seed_of[c], 2) for c in seed_of}
        ref2 = reference_step(ups2, phase_b=sorted(cohort[c] for c in seed_of if c != vid), opts=SAHTiesOptions())
        s2 = theta(d, 2)
        np.testing.assert_allclose(s2["theta"], s1["theta"] + ref2.delta, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(s2["conflict"], ref2.conflict, atol=1e-8)
    finally:
        stop(srv)
    assert verify_log(d / "audit.jsonl").ok
    ev = events(d)
    assert any(e["event"] == "dropout" and e["data"]["stage"] == "b_masked_input" and e["data"]["client"] == vid
               for e in ev)
    assert sum(e["event"] == "round_close" and e["data"].get("aggregator") == "sa_hties" for e in ev) == 2


def test_server_sigkill_between_the_phases_then_restart_completes(tmp_path):
    d, port = make_server(tmp_path, 3, rounds=1, min_clients=3, dim=DIM, aggregator="sa_hties",
                          sa_hties={"h_norm": "none"}, deadlines=FAST)
    srv = start_server(d, port)
    clients = []
    try:
        clients = [start_client(d, i, tmp_path) for i in range(3)]
        # phase A closed (T signed into the phase-B config), phase B under way
        wait_for(lambda: any(r[0] == 1 and r[2].startswith("b_") for r in db_rounds(d)), 60, "round 1 in phase B")
        srv.send_signal(signal.SIGKILL)
        srv.wait()
        stage_at_kill = db_rounds(d)[0][2]
        assert stage_at_kill.startswith("b_"), stage_at_kill
        srv = start_server(d, port)
        for c in clients:
            c.wait(90)
            assert c.returncode == 0
        rounds = db_rounds(d)
        assert rounds[0][1] == "done", rounds
        res = json.loads(rounds[0][3])
        assert len(res["survivors"]) == 3 and res["sa_hties"]["K"] == 3  # resumed: nothing lost
        seed_of = {client_id(tmp_path, i): i for i in range(3)}
        ups = [update(seed_of[c], 1) for c in sorted(seed_of)]
        ref = make_aggregator("sa_hties", h_norm="none").aggregate(ups, [1] * 3, AggState())
        np.testing.assert_allclose(theta(d, 1)["theta"], ref.delta, rtol=1e-6, atol=1e-8)
    finally:
        stop(srv)
        for c in clients:
            stop(c)
    assert verify_log(d / "audit.jsonl").ok
    ev = events(d)
    assert any(e["event"] == "round_resume" and e["data"]["stage"].startswith("b_") for e in ev), stage_at_kill
    con = sqlite3.connect(d / "state.db")
    cfg = json.loads(con.execute("SELECT config FROM rounds WHERE round_id=1").fetchone()[0])
    assert cfg["sa_hties"]["session_id_b"] != cfg["session_id"]  # two sessions, two ids
