"""Integration over the real socket: server process + 3 client processes, loopback mTLS, masking.

Checks the aggregate equals the plaintext sum of the (clipped) updates, dropout recovery when a
client process dies mid-round, and a SIGKILL of the server mid-round followed by a restart.
"""

from __future__ import annotations

import json
import signal

import numpy as np

from fedproxy_secure.auditlog import verify_log
from tests.net_helpers import (db_rounds, expected_sum, make_server, result_sum, start_client, start_server,
                               stop, wait_for)


def _finish(clients, timeout=60):
    for c in clients:
        c.wait(timeout)
        assert c.returncode == 0


def test_three_clients_masking_sum_equals_plaintext(tmp_path):
    d, port = make_server(tmp_path, 3)
    srv = start_server(d, port)
    try:
        clients = [start_client(d, i, tmp_path) for i in range(3)]
        _finish(clients)
        rounds = db_rounds(d)
        assert [r[1] for r in rounds] == ["done", "done"]
        for rid, _, _, res in rounds:
            assert len(json.loads(res)["survivors"]) == 3
            np.testing.assert_allclose(result_sum(res), expected_sum(range(3), rid, 8), atol=1e-8)
        for i in range(3):
            assert json.loads((tmp_path / f"client{i}.json").read_text())["rounds_done"] == [1, 2]
    finally:
        stop(srv)
    res = verify_log(d / "audit.jsonl")
    assert res.ok, res
    events = [json.loads(x)["event"] for x in (d / "audit.jsonl").read_text().splitlines()]
    assert events.count("round_close") == 2 and "federation_end" in events and events.count("enrol") == 3


def test_client_killed_mid_round_is_dropped_and_recovered(tmp_path):
    d, port = make_server(tmp_path, 3)
    srv = start_server(d, port)
    try:
        victim = start_client(d, 2, tmp_path, die_at="1:masked_input")
        others = [start_client(d, i, tmp_path) for i in range(2)]
        victim.wait(60)
        assert victim.returncode == 17  # crashed before sending its masked input
        restarted = start_client(d, 2, tmp_path)  # resumes from its state dir, joins round 2
        _finish(others + [restarted], 90)
        rounds = db_rounds(d)
        assert [r[1] for r in rounds] == ["done", "done"]
        r1 = json.loads(rounds[0][3])
        assert len(r1["survivors"]) == 2
        np.testing.assert_allclose(result_sum(rounds[0][3]), expected_sum([0, 1], 1, 8), atol=1e-8)
        np.testing.assert_allclose(result_sum(rounds[1][3]), expected_sum([0, 1, 2], 2, 8), atol=1e-8)
    finally:
        stop(srv)
    assert verify_log(d / "audit.jsonl").ok
    lines = [json.loads(x) for x in (d / "audit.jsonl").read_text().splitlines()]
    assert any(e["event"] == "dropout" and e["data"]["stage"] == "masked_input" for e in lines)


def test_server_sigkill_mid_round_then_restart_completes(tmp_path):
    d, port = make_server(tmp_path, 3, rounds=2)
    srv = start_server(d, port)
    clients = []
    try:
        clients = [start_client(d, i, tmp_path) for i in range(3)]
        # kill the server as soon as round 1 is past its first secure-aggregation stage
        wait_for(lambda: any(r[0] == 1 and r[2] in ("share", "masked_input", "consistency", "unmask")
                             for r in db_rounds(d)), 60, "round 1 mid-protocol")
        srv.send_signal(signal.SIGKILL)
        srv.wait()
        stage_at_kill = [r for r in db_rounds(d) if r[0] == 1][0][2]
        srv = start_server(d, port)
        _finish(clients, 120)
        rounds = db_rounds(d)
        done = [r for r in rounds if r[1] == "done"]
        assert len(done) == 2, rounds
        for rid, _, _, res in done:
            survivors = json.loads(res)["survivors"]
            assert len(survivors) >= 2
        # resumed round 1 (no accepted update lost): its sum is the plaintext sum of all 3
        seed_of = {json.loads((tmp_path / f"client{i}.json").read_text())["client_id"]: i for i in range(3)}
        for rid, _, _, res in done:
            seeds = [seed_of[c] for c in json.loads(res)["survivors"]]
            np.testing.assert_allclose(result_sum(res), expected_sum(seeds, rid, 8), atol=1e-8)
        r1 = [r for r in rounds if r[0] == 1][0]
        assert r1[1] == "done" and len(json.loads(r1[3])["survivors"]) == 3  # resumed, nothing lost
    finally:
        stop(srv)
        for c in clients:
            stop(c)
    res = verify_log(d / "audit.jsonl")
    assert res.ok, res
    events = [json.loads(x)["event"] for x in (d / "audit.jsonl").read_text().splitlines()]
    assert "round_resume" in events, (stage_at_kill, events)
    # every round has a distinct session id (no mask seed reused)
    import sqlite3
    con = sqlite3.connect(d / "state.db")
    sids = [r[0] for r in con.execute("SELECT session_id FROM rounds")]
    assert len(sids) == len(set(sids))
