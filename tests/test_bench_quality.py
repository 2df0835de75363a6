"""The quality benchmark runs end to end on a tiny model, caches cells, resumes, and its results.json
is exactly what the per-example predictions give."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedproxy_secure.cli.common import load_benchmark
from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.eval import summaries_from_jsonl
from fedproxy_secure.models.tiny import save_tiny_llm

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "bigbench-mini"


def _args(tmp_path: Path, **kw) -> dict:
    llm = save_tiny_llm(TinyModelSpec(layers=10, hidden=32, heads=2, intermediate=64, vocab=259), tmp_path / "llm")
    return dict(llm=llm, data_dir=DATA, out=tmp_path / "out", tasks=["navigate", "strategyqa", "social_support"],
                clients=3, rounds=2, local_steps=1, batch_size=4, limit_train=6, limit_test=6, calib_dir=DATA,
                calib_tasks=["winowhy"], max_length=96, settings=["hetero"], n_boot=200, log=lambda m: None) | kw


def test_quality_benchmark_tiny_all_methods_resume_and_recompute(tmp_path: Path) -> None:
    q = load_benchmark("quality")
    args = _args(tmp_path, seeds=[0, 1])
    res = q.run_quality(q.QualityArgs(**args))
    s = res["settings"]["hetero"]
    assert set(s["methods"]) == set(q.ALL_METHODS)
    assert s["n_per_task"] == {"navigate": 6, "strategyqa": 6, "social_support": 6}
    for m, row in s["methods"].items():
        assert 0.0 <= row["headline"] <= 1.0 and set(row["per_task"]) == set(args["tasks"])
        lo, hi = row["headline_ci"]
        assert lo <= row["headline"] + 1e-9 and row["headline"] <= hi + 1e-9
    assert s["methods"]["fedproxy"]["seeds"] == [0, 1] and s["methods"]["zs_llm"]["seeds"] == [0]
    assert s["methods"]["fedproxy_dp"]["per_seed_headline"]
    # chance on these tasks: balanced accuracy is 1/n_options exactly
    ch = s["methods"]["chance"]["per_task"]
    assert math.isclose(ch["navigate"]["balanced_accuracy"], 0.5) and math.isclose(ch["social_support"]["balanced_accuracy"], 1 / 3)
    cells = {(c["method"], c["seed"]): c for c in res["cells"]}
    assert cells[("fedproxy_dp", 0)]["epsilon_max"] > 0
    assert cells[("sa_hties", 1)]["secure_sum_modes"] == ["masking"]
    out = tmp_path / "out"
    for f in ("results.json", "results.md", "quality.png", "predictions.jsonl"):
        assert (out / f).stat().st_size > 0
    # every number in results.json is recomputed from predictions.jsonl alone
    stored = json.loads((out / "results.json").read_text())["settings"]
    recomputed = json.loads(json.dumps(summaries_from_jsonl(out / "predictions.jsonl", reference="zs_llm",
                                                            upper="centralized", n_boot=200, seed=0)))
    assert recomputed == stored
    # resume: cached cells are reused, not recomputed
    logs: list[str] = []
    q.run_quality(q.QualityArgs(**(args | {"log": logs.append})))
    assert logs and all(m.endswith("cached") for m in logs)


def test_train_size_sweep_tiny(tmp_path: Path) -> None:
    q = load_benchmark("quality")
    res = q.run_train_size(q.QualityArgs(**_args(tmp_path, limit_test=4)), [2, 4])
    assert [r["train_per_task"] for r in res["sizes"]] == [2, 4]
    for r in res["sizes"]:
        assert r["gain_ci"][0] <= r["gain"] + 1e-9 <= r["gain_ci"][1] + 2e-9
    assert (tmp_path / "out" / "train_size.md").read_text().count("centralized") == 2


def test_headline_reuses_the_train_size_runs_identical_centralized_cell(tmp_path: Path) -> None:
    """With one --out for both commands, the headline table takes the train-size run's centralized LoRA for
    the same training (no second training); a different learning rate is not the same training."""
    q = load_benchmark("quality")
    base = _args(tmp_path, limit_train=4, limit_test=4, seeds=[0])
    q.run_train_size(q.QualityArgs(**base), [4])
    ts_rows = json.loads((tmp_path / "out" / "cells" / "centralized_n4__s0.json").read_text())["rows"]
    logs: list[str] = []
    res = q.run_quality(q.QualityArgs(**(base | {"methods": ["centralized"], "log": logs.append})))
    assert any("centralized_n4__s0.json (same training)" in m for m in logs)
    cell = json.loads((tmp_path / "out" / "cells" / "hetero__centralized__s0.json").read_text())
    assert [r["scores"] for r in cell["rows"]] == [r["scores"] for r in ts_rows]
    assert {r["method"] for r in cell["rows"]} == {"centralized"}
    assert "centralized" in res["settings"]["hetero"]["methods"]
    # another learning rate: trained afresh, in another folder sharing the train-size cell
    (tmp_path / "out2" / "cells").mkdir(parents=True)
    (tmp_path / "out2" / "cells" / "centralized_n4__s0.json").write_bytes(
        (tmp_path / "out" / "cells" / "centralized_n4__s0.json").read_bytes())
    logs2: list[str] = []
    q.run_quality(q.QualityArgs(**(base | {"out": tmp_path / "out2", "methods": ["centralized"],
                                           "centralized_lr": 1e-3, "log": logs2.append})))
    assert not any("same training" in m for m in logs2) and any("centralized/seed 0: running" in m for m in logs2)
