"""The whole method in one process, for every example config (tiny model, offline data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedproxy_secure.config import load_run_config
from fedproxy_secure.pipelines.simulate import run_simulation

ROOT = Path(__file__).resolve().parents[1]


def _run(name: str, tmp_path: Path) -> dict:
    cfg = load_run_config(ROOT / "examples" / f"{name}.yaml")
    return run_simulation(cfg, tmp_path / name, log=lambda m: None)


def test_tiny_cli_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    proc = subprocess.run([sys.executable, "-m", "fedproxy_secure.cli.main", "simulate", "--config", "examples/tiny.yaml",
                           "--out", str(out), "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert 0 <= res["llm_before"]["mean_accuracy"] <= 1 and 0 <= res["llm_after"]["mean_accuracy"] <= 1
    assert len(res["train_loss"]) == 2 and all(np.isfinite(res["train_loss"]))
    assert res["config"]["rounds"] == 2 and res["config"]["aggregator"]["name"] == "fedavg"
    assert res["compression"]["n_layers_proxy"] == 4 and len(res["compression"]["layer_map"]) == 4
    assert (out / "global_adapter" / "adapter_model.safetensors").is_file()
    assert "LLM after" in proc.stdout  # the table was printed
    assert [r["round"] for r in res["rounds"]] == [1, 2]  # numbered from 1, as over the network
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "rounds.png").stat().st_size > 0
    assert (out / "run.log").is_file()
    _check_evaluation(res, out)
    _check_adapter_loads_with_peft(out)
    _check_fused_folder_is_what_was_scored(out)


def _check_evaluation(res: dict, out: Path) -> None:
    """results.json carries the shipped evaluator's summary, recomputable from predictions.jsonl."""
    from fedproxy_secure.eval import summaries_from_jsonl

    ev = res["evaluation"]
    assert set(ev["methods"]) == {"zs_llm", "zs_proxy", "proxy_tuned", "fused", "prior_only", "chance"}
    assert all(n == 20 for n in ev["n_per_task"].values())
    for m, row in ev["methods"].items():
        lo, hi = row["diff_ci"]
        assert lo <= row["diff_to_reference"] + 1e-9 and row["diff_to_reference"] - 1e-9 <= hi, m
        assert 0.0 <= row["headline"] <= 1.0
    assert ev["methods"]["chance"]["headline"] == pytest.approx(0.5)  # every tiny task here is binary
    again = summaries_from_jsonl(out / "predictions.jsonl", reference="zs_llm", upper=None)[""]
    for m in ev["methods"]:
        assert again["methods"][m]["headline"] == pytest.approx(ev["methods"][m]["headline"])
    assert res["llm_after"]["balanced_accuracy"] == pytest.approx(ev["methods"]["fused"]["headline"])


def _check_adapter_loads_with_peft(out: Path) -> None:
    """AutoPeftModelForCausalLM loads out/global_adapter onto out/proxy (the adapter's base path)."""
    import torch
    from peft import AutoPeftModelForCausalLM

    cfg = json.loads((out / "global_adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((out / "proxy").resolve())
    assert (out / "proxy" / "fedproxy.json").is_file()
    torch.set_num_threads(1)
    m = AutoPeftModelForCausalLM.from_pretrained(str(out / "global_adapter")).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        tuned = m(input_ids=ids).logits
        with m.disable_adapter():
            base = m(input_ids=ids).logits
    assert tuned.shape == base.shape and not torch.allclose(tuned, base)  # the global LoRA is in the adapter


def _check_fused_folder_is_what_was_scored(out: Path) -> None:
    """The signed fused folder loads through load_fused_model and reproduces the 'fused' prediction rows,
    and its logits differ from the untouched LLM's (the global LoRA was fused in)."""
    import torch

    from fedproxy_secure.eval import model_logits_fn, read_jsonl, score_choices
    from fedproxy_secure.fuse import load_fused_model
    from fedproxy_secure.models import build_tiny_model
    from fedproxy_secure.pipelines.simulate import split_data

    torch.set_num_threads(1)
    cfg = load_run_config(ROOT / "examples" / "tiny.yaml")
    _, _, test_sets, _ = split_data(cfg)
    model = load_fused_model(out / "fused", out / "fused.keyset.json")
    task = next(iter(test_sets))
    exs = test_sets[task][:4]
    rows = {r["example_id"]: r for r in read_jsonl(out / "predictions.jsonl") if r["method"] == "fused" and r["task"] == task}
    scores = score_choices(model_logits_fn(model), model.tokenizer, exs, max_length=cfg.data.max_length)
    for ex, s in zip(exs, scores):
        assert s == pytest.approx(rows[ex.uid]["scores"], abs=1e-3)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        llm = build_tiny_model(cfg.model.tiny).eval()(input_ids=ids).logits
    assert not torch.allclose(fused, llm)


def test_fused_llm_differs_from_input_after_training(tmp_path: Path) -> None:
    res = _run("tiny", tmp_path)
    assert res["rounds"][-1]["global_norm"] > 0  # the global LoRA moved, so fusion changed the LLM
    assert res["fusion"]["modules_fused"] > 0


def test_masked_mode_records_survivors_and_error(tmp_path: Path) -> None:
    res = _run("tiny-masked", tmp_path)
    assert res["secagg_mode"] == "masking"
    for rec in res["rounds"]:
        ss = rec["secure_sum"][0]
        assert ss["mode"] == "masking" and ss["survivors"] == 3 and ss["cohort"] == 4  # one of 4 dropped
        assert ss["max_abs_error_vs_plaintext"] < 1e-6


def test_he_mode(tmp_path: Path) -> None:
    res = _run("tiny-he", tmp_path)
    assert all(s["mode"] == "he" and s["max_abs_error_vs_plaintext"] < 1e-2 for r in res["rounds"] for s in r["secure_sum"])


def test_dp_mode_reports_epsilon_per_client_and_round(tmp_path: Path) -> None:
    res = _run("tiny-dp", tmp_path)
    eps = [[c["epsilon"] for c in r["clients"]] for r in res["rounds"]]
    assert all(0 < e <= 8.0 for row in eps for e in row)
    assert all(b > a for a, b in zip(eps[0], eps[1]))  # spent budget grows round over round
    c = res["rounds"][0]["clients"][0]
    assert c["delta"] == pytest.approx(1e-5) and "prv" in c["accountant"].lower()


def test_hties_records_conflict_and_weights(tmp_path: Path) -> None:
    res = _run("tiny-hties", tmp_path)
    assert res["aggregator"] == "hties"
    for rec in res["rounds"]:
        assert 0 <= rec["mean_conflict"] <= 1
        w = rec["aggregator"]["weights"]
        assert len(w) == 4 and sum(w) == pytest.approx(1.0)


def test_sa_hties_over_masking(tmp_path: Path) -> None:
    res = _run("tiny-sa-hties", tmp_path)
    for rec in res["rounds"]:
        assert [s["mode"] for s in rec["secure_sum"]] == ["masking", "masking"]  # phase A and phase B
        assert 0 <= rec["mean_conflict"] <= 1
        assert max(s["max_abs_error_vs_plaintext"] for s in rec["secure_sum"]) < 1e-6
