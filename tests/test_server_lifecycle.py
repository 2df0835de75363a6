"""`server start` lifecycle: the finished/failed rule, the watcher's one-line logs and stored end
state, `server status --json` exit codes, and a loud failure end to end (server exits 1 with the
reason; a client that took part in no round exits 1 with a one-line reason, no traceback; slow: about
50 s of process start-up and deadlines on the shared machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

import fedproxy_secure.cli.server_net  # noqa: F401  (registers the commands)
from fedproxy_secure.cli.app import app
from fedproxy_secure.server.lifecycle import META_KEY, Watcher, federation_state
from fedproxy_secure.server.rounds import FederationSettings, state_to_bytes
from fedproxy_secure.server.setup import enroll_site, init_server
from fedproxy_secure.server.store import SQLiteStore
from tests.net_helpers import ROOT, env, free_port


def rows(*statuses):
    return [SimpleNamespace(round_id=i + 1, status=s, reason=f"why {i + 1}") for i, s in enumerate(statuses)]


@pytest.mark.parametrize("statuses, state", [
    ((), "not started"), (("done", "open"), "running"), (("done", "aborted", "done"), "finished"),
    (("aborted", "aborted"), "running"), (("aborted", "aborted", "aborted"), "failed"),
])
def test_federation_state_rule(statuses, state):
    st = federation_state(rounds_total=2, max_aborts=2, rounds=rows(*statuses))
    assert st["state"] == state
    if state == "failed":
        assert "3 rounds aborted" in st["reason"] and "max_aborts=2" in st["reason"] and "why 3" in st["reason"]


def test_a_stored_end_state_wins():
    st = federation_state(3, 10, rows("done"), {"state": "failed", "reason": "operator stopped it"})
    assert st["state"] == "failed" and st["reason"] == "operator stopped it"


def _server(tmp_path, **kw):
    d = tmp_path / "srv"
    init_server(d, FederationSettings.from_dict({"rounds": 2, "min_clients": 2, "threshold": 2, "mode": "plain",
                                                 "dim": 4, "a_seed": 5, **kw}))
    return d


def test_watcher_logs_each_round_and_stores_failed_then_status_exits_1(tmp_path):
    d = _server(tmp_path, max_aborts=1)
    st = SQLiteStore(d / "state.db")
    lines: list[str] = []
    w = Watcher(st, FederationSettings.from_dict(json.loads((d / "federation.json").read_text())), lines.append)
    st.put_global_state(0, state_to_bytes(np.zeros(4)))
    st.open_round(1, "01" * 32, "join", 0.0, {})
    st.close_round(1, "done", "ok", {"survivors": [], "delta_norm": 0.123456789}, state_to_bytes(np.ones(4)))
    assert w.step() is None
    r = CliRunner().invoke(app, ["server", "status", "--dir", str(d), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["federation"]["state"] == "running"
    for rid in (2, 3):
        st.open_round(rid, f"{rid:02d}" * 32, "join", 0.0, {})
        st.close_round(rid, "aborted", f"only 1 clients joined (round {rid})", None, None)
    end = w.step()
    assert end["state"] == "failed" and "(round 3)" in end["reason"]
    assert json.loads(st.get_meta(META_KEY))["state"] == "failed"
    st.close()
    assert "round 1: open, waiting for sites to join" in lines
    assert any(x.startswith("round 1 done") and "|update| 0.123" in x and "0.1234" not in x for x in lines)
    assert "round 3 aborted: only 1 clients joined (round 3)" in lines
    r = CliRunner().invoke(app, ["server", "status", "--dir", str(d), "--json"])
    assert r.exit_code == 1 and json.loads(r.output)["federation"]["state"] == "failed"
    r = CliRunner().invoke(app, ["server", "status", "--dir", str(d)])
    assert r.exit_code == 1 and "failed" in r.output


@pytest.mark.parametrize("dropped, words", [([3], "dropped from rounds [3]"), ([], "no round was open")])
def test_client_join_in_no_round_exits_1_with_one_line(tmp_path, monkeypatch, dropped, words):
    import fedproxy_secure.cli.client_join  # noqa: F401  (registers the command)
    from fedproxy_secure.client import join_main
    from fedproxy_secure.client.join import JoinResult

    d = _server(tmp_path)
    enroll_site(d, "late", "https://127.0.0.1:1")
    (tmp_path / "client.yaml").write_text(f"enrolment: {d / 'enrol' / 'late'}\nstate_dir: {tmp_path / 'cs'}\n"
                                          "trainer: synthetic\npolicy: {require_dp: false}\n")
    monkeypatch.setattr(join_main, "run_from_config",
                        lambda *a, **k: JoinResult("c-late", rounds_done=[], rounds_dropped=dropped))
    r = CliRunner().invoke(app, ["client", "join", "--config", str(tmp_path / "client.yaml")])
    assert r.exit_code == 1 and "took part in no round" in r.output and words in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    monkeypatch.setattr(join_main, "run_from_config", lambda *a, **k: JoinResult("c-late", rounds_done=[4]))
    assert CliRunner().invoke(app, ["client", "join", "--config", str(tmp_path / "client.yaml")]).exit_code == 0


@pytest.mark.slow
def test_repeated_aborts_stop_the_server_loudly_and_a_client_in_no_round_exits_1(tmp_path):
    port = free_port()
    d = _server(tmp_path, max_aborts=0, deadlines={"join": 12})
    enroll_site(d, "lonely", f"https://127.0.0.1:{port}")
    (tmp_path / "client.yaml").write_text(f"enrolment: {d / 'enrol' / 'lonely'}\nstate_dir: {tmp_path / 'cs'}\n"
                                          "trainer: synthetic\npolicy: {require_dp: false}\n")
    cli = [sys.executable, "-c", "import torch; torch.set_num_threads(1); from fedproxy_secure.cli.main import main; "
           "main()"]
    srv = subprocess.Popen([*cli, "server", "start", "--dir", str(d), "--port", str(port), "--linger", "3"], cwd=ROOT,
                           env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        c = subprocess.run([*cli, "client", "join", "--config", str(tmp_path / "client.yaml"), "--max-wait", "90"],
                           cwd=ROOT, env={**env(), "COLUMNS": "200"}, capture_output=True, text=True, timeout=150)
        out, _ = srv.communicate(timeout=90)
    finally:
        if srv.poll() is None:
            srv.kill()
    assert srv.returncode == 1, out
    assert "federation FAILED" in out and "1 rounds aborted" in out and "clients joined by the deadline" in out
    assert c.returncode == 1, c.stdout + c.stderr
    assert "took part in no round" in c.stderr and "Traceback" not in c.stdout + c.stderr
    r = CliRunner().invoke(app, ["server", "status", "--dir", str(d), "--json"])
    assert r.exit_code == 1 and json.loads(r.output)["federation"]["state"] == "failed"
