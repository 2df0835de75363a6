"""`fedproxy-secure demo` on the tiny preset file: real DP LoRA training through the networked flow
(signed bundle fetched and verified by each client, masking, fusion, evaluation); its audit log
verifies and an edit fails; `server status` shows ε per client; `audit check` passes on its state."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.net_helpers import ROOT, env, run_short_demo

def test_demo_tiny_real_training_and_audit(tmp_path):
    # with the proxy scored alone and the no-DP baseline beside the DP run (its sites opt out of policy.require_dp)
    r, out = run_short_demo("demo-tiny.yaml", tmp_path, timeout=420, proxy=True, no_dp_baseline=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("report.md", "results.json", "rounds.png", "audit.jsonl", "server/state.db",
              "server/global_adapter/adapter_model.safetensors", "server/bundle/MANIFEST.sig"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert res["rounds_done"] == 2 and res["audit_log_ok"] and res["trainer"].startswith("lora")
    # every site trained for real in both rounds: DP ε reported, growing, within the budget
    for rnd in res["rounds"]:
        assert rnd["status"] == "done" and rnd["survivors"] == 3
        eps = rnd["epsilon_by_site"]
        assert sorted(eps) == ["site0", "site1", "site2"]
        assert all(0 < e <= 8.0 for e in eps.values())
        assert all(l is not None and l > 0 for l in rnd["train_loss_by_site"].values())
        assert 0 < rnd["aggregate_norm"] <= 3 * 1.0 + 1e-6  # secure sum of 3 updates clipped to 1
    assert all(res["rounds"][1]["epsilon_by_site"][s] > res["rounds"][0]["epsilon_by_site"][s] for s in ("site0",))
    assert res["global_theta_norm"] > 0 and res["lora_dim"] == res["settings"]["dim"]
    assert set(res["llm_before"]["per_task"]) == set(res["llm_after"]["per_task"]) and len(res["llm_after"]["per_task"]) == 6
    for s in res["client_summaries"]:
        assert s["rounds_done"] == [1, 2] and s["rounds_dropped"] == []
    logs = "".join((out / "logs" / f"client{i}.log").read_text() for i in range(3))
    assert logs.count("verified (key") == 3  # each client verified the bundle against its pinned keyset
    report = (out / "report.md").read_text()
    assert "| **mean** |" in report and "operator's evaluation data" in report
    # evaluated through the shipped evaluator; the fused LLM was scored from its signed folder
    ev = res["evaluation"]
    assert {"zs_llm", "fused", "prior_only", "chance"} <= set(ev["methods"]) and ev["reference"] == "zs_llm"
    assert all(len(ev["methods"][m]["diff_ci"]) == 2 for m in ev["methods"])
    assert res["fusion"]["loaded_with"] == "fedproxy_secure.fuse.load_fused_model"
    assert (out / "fused" / "MANIFEST.sig").is_file() and (out / "predictions.jsonl").is_file()
    assert "95% CI of Δ" in report and "## Server supervision" in report and res["server_crashes"] == []
    # stage decomposition: the proxy's own gain (stage ii) and the share the plug-in carried (stage iii), DP and no-DP
    dec = res["stage_decomposition"]
    assert "## Stage decomposition" in report
    for g in ("proxy_tuned - zs_proxy", "fused - zs_llm", "proxy_tuned_nodp - zs_proxy", "fused_nodp - zs_llm"):
        lo, hi = dec["gains"][g]["ci"]
        assert lo <= dec["gains"][g]["value"] <= hi
    assert "missing" not in dec["carried"] and "missing" not in dec["carried_nodp"]
    assert res["no_dp"]["rounds_done"] == 2 and "**Without DP**" in report
    acfg = json.loads((out / "server" / "global_adapter" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str((out / "proxy").resolve()) and (out / "proxy" / "fedproxy.json").is_file()
    # no private key or token left in the output
    leftovers = [p for p in out.rglob("*") if p.name in ("ca.key", "server.key", "operator.key", "client.key",
                                                          "identity.key", "token")]
    assert not leftovers, leftovers
    # server status shows ε per client
    st = subprocess.run([sys.executable, "-m", "fedproxy_secure.cli.main", "server", "status", "--dir", str(out / "server"), "--json"],
                        cwd=ROOT, env=env(), capture_output=True, text=True)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert all(c["epsilon"] is not None and 0 < c["epsilon"] <= 8 for c in status["clients"])
    assert all(len(r_["epsilon"]) == 3 for r_ in status["rounds"])
    # the config and the server state it produced pass the audit
    chk = subprocess.run([sys.executable, "-m", "fedproxy_secure.cli.main", "audit", "check", "--config", str(tmp_path / "demo.yaml"),
                          "--server-state", str(out / "server")], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout[-3000:]
    # the audit log verifies; an edited line is caught
    cmd = [sys.executable, "-m", "fedproxy_secure.cli.main", "audit", "verify-log", str(out / "audit.jsonl")]
    assert subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True).returncode == 0
    lines = (out / "audit.jsonl").read_text().splitlines(keepends=True)
    e = json.loads(lines[7]); e["ts"] += 1; lines[7] = json.dumps(e, separators=(",", ":")) + "\n"
    (out / "audit.jsonl").write_text("".join(lines))
    bad = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    assert bad.returncode == 1 and "line 8" in bad.stderr
