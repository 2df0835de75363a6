"""The quality benchmark runs every method end to end on a tiny model, caches cells and resumes."""

from __future__ import annotations

import json
from pathlib import Path

from fedproxy_secure.cli.common import load_benchmark
from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.models.tiny import save_tiny_llm

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "bigbench-mini"


def test_quality_benchmark_tiny_all_methods_and_resume(tmp_path: Path) -> None:
    q = load_benchmark("quality")
    llm = save_tiny_llm(TinyModelSpec(layers=10, hidden=32, heads=2, intermediate=64, vocab=259), tmp_path / "llm")
    args = dict(llm=llm, data_dir=DATA, out=tmp_path / "out", tasks=["navigate", "strategyqa", "social_support"],
                clients=3, rounds=2, local_steps=1, batch_size=4, limit_train=6, limit_test=4, calib_dir=DATA,
                calib_tasks=["winowhy"], max_length=96, settings=["hetero"], log=lambda m: None)
    summary = q.run_quality(q.QualityArgs(**args))
    table = summary["settings"]["hetero"]["methods"]
    assert set(table) == set(q.ALL_METHODS)
    for row in table.values():
        assert 0.0 <= row["mean"] <= 1.0 and set(row["per_task"]) == set(args["tasks"])
    assert len(table["fedproxy"]["curve"]) == 2  # fused LLM evaluated after each round
    assert table["fedproxy_dp"]["epsilon_max"] > 0
    assert summary["groups"] == {"qa_like": ["navigate", "strategyqa"], "classification": ["social_support"]}
    for f in ("results.json", "results.md", "accuracy.png", "rounds.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    sa = json.loads((tmp_path / "out" / "cells" / "hetero__sa_hties.json").read_text())
    assert all(s["mode"] == "masking" for r in sa["rounds"] for s in r["secure_sum"])
    # resume: cached cells are reused, not recomputed
    logs: list[str] = []
    q.run_quality(q.QualityArgs(**(args | {"log": logs.append})))
    assert logs and all(m.endswith("cached") for m in logs)
