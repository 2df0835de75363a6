"""`fedproxy-secure demo --preset tiny` runs the networked flow; its audit log verifies, an edit fails."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.net_helpers import ROOT, env


def test_demo_tiny_and_audit_verify(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--preset", "tiny", "--out", str(out)],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    for f in ("report.md", "results.json", "rounds.png", "audit.jsonl", "server/state.db"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert res["rounds_done"] == 3 and res["audit_log_ok"]
    assert not (out / "server" / "pki" / "ca.key").exists()  # no private keys left in the output
    cmd = [sys.executable, "-m", "cli.main", "audit", "verify-log", str(out / "audit.jsonl")]
    assert subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True).returncode == 0
    lines = (out / "audit.jsonl").read_text().splitlines(keepends=True)
    e = json.loads(lines[7]); e["ts"] += 1; lines[7] = json.dumps(e, separators=(",", ":")) + "\n"
    (out / "audit.jsonl").write_text("".join(lines))
    bad = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    assert bad.returncode == 1 and "line 8" in bad.stderr
