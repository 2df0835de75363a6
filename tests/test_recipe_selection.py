"""Recipe selection reads validation data only: changing every test label changes nothing it reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedproxy_secure.cli.common import load_benchmark
from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.data import load_task, split_task
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.models.tiny import save_tiny_llm

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "bigbench-mini"
TASKS = ["navigate", "social_support"]
LIMIT_TRAIN, LIMIT_TEST = 10, 6


def _flip_test_labels(src: Path, dst: Path) -> None:
    """Copy the tasks, moving the gold answer of every example in the fixed test split to another option."""
    shutil.copytree(src, dst)
    for t in TASKS:
        path = dst / f"{t}.json"
        raw = json.loads(path.read_text())
        _, test = split_task(load_task(src, t), LIMIT_TRAIN, LIMIT_TEST, seed=0)
        for ex in test:
            scores = raw["examples"][ex.uid]["target_scores"]
            keys = list(scores)
            gold = next(k for k in keys if scores[k] == max(scores.values()))
            new = keys[(keys.index(gold) + 1) % len(keys)]
            raw["examples"][ex.uid]["target_scores"] = {k: int(k == new) for k in keys}
        path.write_text(json.dumps(raw))


def _select(tmp_path: Path, data: Path, llm: Path, name: str) -> dict:
    q, rc = load_benchmark("quality"), load_benchmark("recipe")
    base = q.QualityArgs(llm=llm, data_dir=data, out=tmp_path / name, tasks=TASKS, clients=2, rounds=2,
                         local_steps=1, batch_size=4, limit_train=LIMIT_TRAIN, limit_test=LIMIT_TEST, val_per_task=3,
                         calib_dir=DATA, calib_tasks=["winowhy"], max_length=96, log=lambda m: None)
    grid = [rc.Candidate(name="slow", lr=1e-4), rc.Candidate(name="fast", lr=5e-2, update_clip_norm=20.0,
                                                            server_optimizer={"name": "avgm", "lr": 1.0})]
    return rc.run_recipe_selection(base, grid, "dir1.0", seed=0)


def test_changing_test_labels_changes_neither_the_choice_nor_the_curves(tmp_path: Path, monkeypatch) -> None:
    import fedproxy_secure.eval.score_cache as sc

    scored: list[tuple[str, int]] = []
    real = sc.timed_scores

    def spy(logits_fn, tokenizer, examples, **kw):
        scored.extend((ex.task, ex.uid) for ex in examples)
        return real(logits_fn, tokenizer, examples, **kw)

    monkeypatch.setattr(sc, "timed_scores", spy)
    llm = save_tiny_llm(TinyModelSpec(layers=4, hidden=32, heads=2, intermediate=64, vocab=259), tmp_path / "llm")
    flipped = tmp_path / "flipped"
    _flip_test_labels(DATA, flipped)
    a = _select(tmp_path, DATA, llm, "orig")
    test_ids = {(t, ex.uid) for t in TASKS for ex in split_task(load_task(DATA, t), LIMIT_TRAIN, LIMIT_TEST, seed=0)[1]}
    assert scored and not set(scored) & test_ids  # every example the selection scored is a validation example
    b = _select(tmp_path, flipped, llm, "flipped")
    assert a["chosen"] == b["chosen"]
    for name in ("slow", "fast"):
        va = [c["val_balanced_accuracy"] for c in a["candidates"][name]["curve"]]
        vb = [c["val_balanced_accuracy"] for c in b["candidates"][name]["curve"]]
        assert va == vb and len(va) == 2
    # positive control: the flip really changed the test split (a test-reading selector would see it)
    orig = split_task(load_task(DATA, "navigate"), LIMIT_TRAIN, LIMIT_TEST, seed=0)[1]
    new = split_task(load_task(flipped, "navigate"), LIMIT_TRAIN, LIMIT_TEST, seed=0)[1]
    assert [e.uid for e in orig] == [e.uid for e in new] and all(x.answer != y.answer for x, y in zip(orig, new))
    assert (tmp_path / "orig" / "recipe.png").stat().st_size > 0


def test_grid_errors_name_the_entry(tmp_path: Path) -> None:
    rc = load_benchmark("recipe")
    bad = tmp_path / "g.yaml"
    bad.write_text("candidates:\n  - {name: a, lr: -1}\n")
    with pytest.raises(ConfigError, match=r"candidates\[0\]\.lr"):
        rc.load_grid(bad)
    grid = rc.load_grid(Path(__file__).resolve().parents[1] / "examples" / "recipe-grid.yaml")
    assert len(grid) >= 2
