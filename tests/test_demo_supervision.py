"""The demo supervises its server: a crashed server is restarted once and the crash is reported;
a second crash fails loudly. The fast tests drive ServerSupervisor with stand-in processes; the slow
test SIGKILLs the real demo's server mid-federation on the tiny preset."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedproxy_secure.errors import FedProxyError
from fedproxy_secure.pipelines.demo import ServerSupervisor
from tests.net_helpers import ROOT, demo_cmd, env, free_port, short_demo_config

# a stand-in "server": listens on the port given as argv[1] until killed
LISTENER = ("import socket, sys, time\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(600)\n")


def _supervisor(tmp_path: Path, max_restarts: int = 1) -> tuple[ServerSupervisor, list[str]]:
    port = free_port()
    logs: list[str] = []
    cmd = [sys.executable, "-c", LISTENER, str(port)]
    sup = ServerSupervisor(cmd, dict(os.environ), tmp_path / "server.log", port, tmp_path, logs.append,
                           max_restarts=max_restarts, pid_file=tmp_path / "server.pid")
    return sup, logs


def _kill_and_wait(sup: ServerSupervisor) -> None:
    pid = int((sup.pid_file).read_text())
    assert pid == sup.proc.pid
    os.kill(pid, signal.SIGKILL)
    sup.proc.wait(10)


def test_supervisor_restarts_once_and_records_the_crash(tmp_path: Path) -> None:
    sup, logs = _supervisor(tmp_path)
    sup.start()
    try:
        sup.check()
        assert sup.crashes == []  # alive: nothing recorded
        first = sup.proc.pid
        _kill_and_wait(sup)
        sup.check()
        assert len(sup.crashes) == 1 and sup.proc.pid != first and sup.proc.poll() is None
        c = sup.crashes[0]
        assert c["exit_code"] == -signal.SIGKILL and c["signal"] == "SIGKILL" and c["restarted"] is True
        assert c["time_utc"].endswith("+00:00")
        assert any("died" in m and "SIGKILL" in m for m in logs)
        with socket.create_connection(("127.0.0.1", sup.port), timeout=2):
            pass  # the restarted server listens again
    finally:
        sup.stop()
    assert sup.proc.poll() is not None and len(sup.crashes) == 1  # a requested stop is not a crash


def test_supervisor_fails_loudly_on_a_second_crash(tmp_path: Path) -> None:
    sup, _ = _supervisor(tmp_path)
    sup.start()
    try:
        _kill_and_wait(sup)
        sup.check()
        _kill_and_wait(sup)
        with pytest.raises(FedProxyError, match="died again .*SIGKILL"):
            sup.check()
        assert [c["restarted"] for c in sup.crashes] == [True, False]
    finally:
        sup.stop()


def test_supervisor_records_the_round_from_the_store(tmp_path: Path) -> None:
    con = sqlite3.connect(tmp_path / "state.db")
    con.execute("CREATE TABLE rounds (round_id INTEGER, status TEXT, stage TEXT, result TEXT)")
    con.executemany("INSERT INTO rounds VALUES (?, ?, ?, NULL)", [(1, "done", "done"), (2, "open", "masked_input")])
    con.commit()
    con.close()
    sup, _ = _supervisor(tmp_path, max_restarts=0)
    sup.start()
    try:
        _kill_and_wait(sup)
        with pytest.raises(FedProxyError):
            sup.check()
    finally:
        sup.stop()
    c = sup.crashes[0]
    assert (c["round"], c["status"], c["stage"]) == (2, "open", "masked_input")


def _done_rounds(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
        try:
            return con.execute("SELECT COUNT(*) FROM rounds WHERE status = 'done'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_demo_reports_a_killed_server_and_still_finishes(tmp_path: Path) -> None:
    """SIGKILL the tiny demo's server after round 1; the demo restarts it, finishes both rounds, runs the
    non-DP baseline beside it, and names the crash in results.json and report.md."""
    cfg = short_demo_config("demo-tiny.yaml", tmp_path, timeout_s=600, no_dp_baseline=True)
    out = tmp_path / "demo"
    proc = subprocess.Popen(demo_cmd(cfg, out), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    killed = None
    t_end = time.time() + 1500
    while time.time() < t_end and proc.poll() is None:
        pid_file = out / "logs" / "server.pid"
        if pid_file.is_file() and _done_rounds(out / "server" / "state.db") >= 1:
            killed = int(pid_file.read_text())
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.5)
    assert killed is not None, "the demo never finished round 1"
    output, _ = proc.communicate(timeout=max(60, t_end - time.time()))
    assert proc.returncode == 0, output[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["rounds_done"] == 2
    (crash,) = res["server_crashes"]
    assert crash["signal"] == "SIGKILL" and crash["exit_code"] == -9 and crash["restarted"] is True
    assert crash["round"] in (1, 2)
    report = (out / "report.md").read_text()
    assert "## Server supervision" in report and "SIGKILL" in report and "crashed 1 time" in report
    # the non-DP federation ran beside it, and the report states ε and both differences with CIs
    assert res["no_dp"]["rounds_done"] == 2
    ev = res["evaluation"]["methods"]
    for m in ("zs_llm", "fused", "fused_nodp", "prior_only", "chance"):
        assert len(ev[m]["diff_ci"]) == 2
    assert "ε = 8.0" in report and "Without DP" in report and "DP cost" in report
    assert (out / "accuracy.png").is_file() and (out / "rounds.png").is_file()
