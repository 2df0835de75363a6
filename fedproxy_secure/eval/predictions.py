"""Per-example predictions (JSONL) and every reported metric recomputed from them.

One line per (method, seed, task, example)::

    {"method": str, "seed": int, "task": str, "example_id": int, "gold": int,
     "options": [str, ...], "scores": [float, ...]}

``summarise_predictions`` is the only place the benchmark tables get their numbers from, so a
results.json can always be checked against its predictions.jsonl without re-running any model.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedproxy_secure.errors import DataError
from fedproxy_secure.eval.bootstrap import paired_bootstrap
from fedproxy_secure.eval.metrics import TaskView, credits, macro_mean, task_metrics


class PredictionRow(BaseModel):
    """One method's option scores on one test example (validated when read back)."""

    model_config = ConfigDict(extra="forbid")
    method: str
    seed: int
    task: str
    example_id: int
    gold: int = Field(ge=0)
    options: list[str]
    scores: list[float]
    setting: str = ""


def rows_for(method: str, seed: int, examples: Sequence, scores: Sequence[Sequence[float]]) -> list[dict]:
    """Prediction rows for ``examples`` (MCExample-like: task, uid, answer, choices) scored by one method."""
    if len(examples) != len(scores):
        raise ValueError(f"scores: {len(scores)} rows for {len(examples)} examples")
    return [{"method": method, "seed": int(seed), "task": ex.task, "example_id": int(ex.uid), "gold": int(ex.answer),
             "options": list(ex.choices), "scores": [float(x) for x in s]} for ex, s in zip(examples, scores)]


def write_jsonl(rows: Iterable[Mapping], path: str | Path) -> None:
    """Write rows, one JSON object per line (overwrites ``path``)."""
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read and validate prediction rows; DataError names the line at fault."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(PredictionRow.model_validate_json(line).model_dump())
            except Exception as exc:  # pydantic ValidationError or JSON error
                raise DataError(f"{path}:{i}: not a prediction row ({str(exc).splitlines()[0]})") from None
    return out


def _views(rows: Sequence[Mapping]) -> dict[str, tuple[list[int], TaskView]]:
    """Per task: the sorted example ids and the TaskView, from the rows of any one method."""
    seen: dict[str, dict[int, tuple[tuple[str, ...], int]]] = defaultdict(dict)
    for r in rows:
        seen[r["task"]].setdefault(r["example_id"], (tuple(r["options"]), r["gold"]))
    out = {}
    for t, ex in seen.items():
        ids = sorted(ex)
        out[t] = (ids, TaskView(tuple(ex[i][0] for i in ids), tuple(ex[i][1] for i in ids)))
    return out


def credit_table(rows: Sequence[Mapping]) -> tuple[dict, dict[str, TaskView], dict[str, dict[int, dict[str, np.ndarray]]]]:
    """``(ids per task, views per task, credits[method][seed][task])`` with credits aligned to the ids.

    Raises DataError when a (method, seed) lacks an example another one has (unpaired predictions).
    """
    views = _views(rows)
    by: dict[tuple[str, int, str], dict[int, list[float]]] = defaultdict(dict)
    for r in rows:
        by[(r["method"], r["seed"], r["task"])][r["example_id"]] = r["scores"]
    cred: dict[str, dict[int, dict[str, np.ndarray]]] = defaultdict(dict)
    for (m, s, t), sc in by.items():
        ids, view = views[t]
        if set(sc) != set(ids):
            raise DataError(f"predictions: method {m!r} seed {s} task {t!r} has {len(sc)} of {len(ids)} examples; "
                            "every method must score the same test examples")
        cred[m].setdefault(s, {})[t] = credits(view, [sc[i] for i in ids])
    for m, seeds in cred.items():
        for s, tasks in seeds.items():
            if set(tasks) != set(views):
                raise DataError(f"predictions: method {m!r} seed {s} lacks tasks {sorted(set(views) - set(tasks))}")
    return {t: v[0] for t, v in views.items()}, {t: v[1] for t, v in views.items()}, cred


def summarise_predictions(rows: Sequence[Mapping], *, reference: str = "zs_llm", upper: str | None = "centralized",
                          n_boot: int = 2000, seed: int = 0) -> dict:
    """Every metric of the tables, from prediction rows alone.

    Per method: per-task accuracy / balanced accuracy / n (credits averaged over seeds, so each equals
    the seed mean), the headline (macro balanced accuracy), its value per seed with mean and sample
    std, and when ``reference`` (zero-shot) is present the paired bootstrap 95% CIs of the headline,
    of the difference to ``reference`` and, when ``upper`` is present, of the ratio
    ``(m - reference) / (upper - reference)`` (recovery; transfer when upper is the LLM LoRA).
    """
    if not rows:
        raise DataError("predictions: no rows to summarise")
    _, views, cred = credit_table(rows)
    groups = {t: v.groups() for t, v in views.items()}
    mean_credit = {m: {t: np.mean([seeds[s][t] for s in seeds], axis=0) for t in views} for m, seeds in cred.items()}
    out: dict = {"n_per_task": {t: len(v.gold) for t, v in views.items()},
                 "fixed_label": {t: v.fixed_label for t, v in views.items()}, "methods": {}}
    for m, seeds in cred.items():
        per_task = {t: task_metrics(views[t], mean_credit[m][t]) for t in sorted(views)}
        per_seed = {int(s): macro_mean({t: task_metrics(views[t], c[t]) for t in views}) for s, c in sorted(seeds.items())}
        vals = np.array(list(per_seed.values()))
        out["methods"][m] = {
            "per_task": per_task, "headline": macro_mean(per_task),
            "macro_accuracy": macro_mean(per_task, "accuracy"),
            "seeds": sorted(per_seed), "per_seed_headline": per_seed,
            "seed_mean": float(vals.mean()), "seed_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
        }
    if reference in mean_credit:
        ci = paired_bootstrap(mean_credit, groups, reference=reference,
                              upper=upper if upper in mean_credit else None, n_boot=n_boot, seed=seed)
        zs = out["methods"][reference]["headline"]
        up = out["methods"][upper]["headline"] if upper in out["methods"] else None
        for m, row in out["methods"].items():
            row["headline_ci"] = ci[m]["headline_ci"]
            row["diff_to_reference"] = row["headline"] - zs
            row["diff_ci"] = ci[m]["diff_ci"]
            if up is not None:
                row["ratio"] = (row["headline"] - zs) / (up - zs) if abs(up - zs) > 1e-12 else None
                row["ratio_ci"] = ci[m]["ratio_ci"]
    out["reference"], out["upper"], out["n_boot"], out["bootstrap_seed"] = reference, upper, n_boot, seed
    return out


def summaries_from_jsonl(path: str | Path, **kw) -> dict[str, dict]:
    """``{setting: summarise_predictions(rows of that setting, **kw)}`` for a predictions.jsonl file."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in read_jsonl(path):
        by[r["setting"]].append(r)
    return {s: summarise_predictions(rows, **kw) for s, rows in by.items()}
