"""`fedproxy-secure demo` with `examples/demo-tiny-he.yaml`: the networked demo end to end in HE (CKKS)
mode with real DP LoRA training; every round completes with all 3 sites, the report names HE, the
audit log verifies and no private key (the server's HE statement key included) is left in the output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.net_helpers import ROOT, env, run_short_demo


@pytest.mark.slow  # ~50 s of real training + CKKS on 2 loaded cores
def test_demo_tiny_he_end_to_end(tmp_path):
    assert yaml.safe_load((ROOT / "examples" / "demo-tiny-he.yaml").read_text())["federation"]["mode"] == "he"
    r, out = run_short_demo("demo-tiny-he.yaml", tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["mode"] == "he" and res["rounds_done"] == 2 and res["audit_log_ok"]
    for rnd in res["rounds"]:
        assert rnd["status"] == "done" and rnd["survivors"] == 3, rnd
        assert sorted(rnd["survivor_sites"]) == ["site0", "site1", "site2"]
        # decrypted (flooded) sum of 3 updates clipped to 1; FedAvg step = sum / 3
        assert 0 < rnd["aggregate_norm"] <= 3 * 1.0 + 1e-3
        assert rnd["delta_norm"] == pytest.approx(rnd["aggregate_norm"] / 3, rel=1e-6)
    for s in res["client_summaries"]:
        assert s["rounds_done"] == [1, 2] and s["rounds_dropped"] == []
    assert res["global_theta_norm"] > 0
    # the CKKS key holder rotates over the cohort: a different site in each round
    holders = [rnd["he_key_holder"] for rnd in res["rounds"]]
    assert len(set(holders)) == 2 and set(holders) <= {"site0", "site1", "site2"}, holders
    report = (out / "report.md").read_text()
    assert "Rounds completed: **2 / 2**" in report and "`he` secure aggregation" in report
    assert "CKKS key holder" in report
    leftovers = [p for p in out.rglob("*") if p.suffix == ".key" or p.name == "token"]
    assert not leftovers, leftovers
    cmd = [sys.executable, "-m", "fedproxy_secure.cli.main", "audit", "verify-log", str(out / "audit.jsonl")]
    assert subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True).returncode == 0
