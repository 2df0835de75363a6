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
    proxies = {f"{m}@proxy" for m in (*q.FEDERATED, "centralized_proxy")}  # each tuned proxy also scored alone
    assert set(s["methods"]) == set(q.ALL_METHODS) | proxies
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
    dec = res["decomposition"]["hetero"]
    assert set(dec["methods"]) == set(q.FEDERATED)
    assert "missing" not in dec["stage_iii_transfer"]  # every input of the ratio was run
    assert "Stage decomposition" in (out / "results.md").read_text()
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


def test_label_skew_setting_with_validation_curves(tmp_path: Path) -> None:
    """dir<alpha>: label skew over clients; with --val-per-task every round scores the global proxy on
    held-out training data, and each federated cell writes its curve PNG; the decomposition is filled."""
    q = load_benchmark("quality")
    args = _args(tmp_path, settings=["dir0.5"], methods=["zs_proxy", "fedavg", "centralized_proxy", "centralized"],
                 limit_train=10, val_per_task=3, server_optimizer={"name": "avgm", "lr": 1.0, "beta1": 0.5})
    res = q.run_quality(q.QualityArgs(**args))
    cell = next(c for c in res["cells"] if c["method"] == "fedavg")
    assert [c["round"] for c in cell["curve"]] == [1, 2]
    assert all(0.0 <= c["val_balanced_accuracy"] <= 1.0 and len(c["pre_clip_norms"]) == 3 for c in cell["curve"])
    assert cell["curve"][0]["server_step"]["optimizer"] == "avgm"
    assert (tmp_path / "out" / "curves" / "dir0.5__fedavg__s0.png").stat().st_size > 0
    d = res["decomposition"]["dir0.5"]
    for key in ("stage_ii_efficiency", "recovery"):
        r = d["methods"]["fedavg"][key]
        assert r.get("missing") is None and (r["value"] is None or r["ci"] is not None)
    assert d["stage_iii_transfer"].get("missing") is None


def test_label_skew_partition_is_deterministic_and_covers_every_example_once() -> None:
    q = load_benchmark("quality")
    from fedproxy_secure.data import load_task, split_task

    train = {t: split_task(load_task(DATA, t, prompt_format="reference"), 10, 6, seed=0)[0]
             for t in ("navigate", "social_support")}
    a, _ = q.client_partition(train, "dir0.5", 4, seed=3)
    b, _ = q.client_partition(train, "dir0.5", 4, seed=3)
    c, _ = q.client_partition(train, "dir0.5", 4, seed=4)
    key = lambda parts: [[(ex.task, ex.uid) for ex in p] for p in parts]  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)
    flat = [k for p in key(a) for k in p]
    assert sorted(flat) == sorted((ex.task, ex.uid) for exs in train.values() for ex in exs)  # each example once
    assert all(len(p) >= 1 for p in a)
