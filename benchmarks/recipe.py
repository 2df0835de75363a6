"""Recipe selection for stage ii on validation data only: which federation converges, measured per round.

Each candidate is a set of overrides of the quality benchmark's federation recipe (client lr and
schedule, update clip, rounds x local steps, server optimizer). Every candidate federates the same BI
proxy on the same clients (the quality benchmark's split and partition, so the choice carries over),
and after every round the global proxy is scored on a validation set held out of the training split.
The candidate with the best validation score (mean over the last ``smooth`` rounds) is chosen.

Guarantee: nothing here scores, reads or returns anything of the test split; the test split is
only carved out of each task file so that training and validation sets are exactly those of
``bench quality`` (``tests/test_recipe_selection.py`` changes every test label and gets the same
choice and the same curves).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedproxy_benchmarks.quality import QualityArgs, _json_default, _portable_args, _run_config, _Shared, round_curve
from fedproxy_secure.errors import ConfigError


class Candidate(BaseModel):
    """One recipe: overrides of :class:`~fedproxy_benchmarks.quality.QualityArgs` (unset = the base run's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    method: str = Field("fedavg", pattern="^(fedavg|fedproxy|sa_hties)$")
    lr: float | None = Field(None, gt=0)
    lr_schedule: str | None = Field(None, pattern="^(constant|cosine)$")
    update_clip_norm: float | None = Field(None, gt=0)
    rounds: int | None = Field(None, ge=1)
    local_steps: int | None = Field(None, ge=1)
    server_optimizer: dict[str, Any] | None = None


def load_grid(path: str | Path) -> list[Candidate]:
    """Candidates from a YAML file ``{candidates: [{name: ..., lr: ...}, ...]}``; ConfigError names the entry."""
    from fedproxy_secure.config import read_yaml_mapping

    data = read_yaml_mapping(path, what="--grid")
    items = data.get("candidates")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"--grid {path}: needs a non-empty 'candidates' list")
    out = []
    for i, it in enumerate(items):
        try:
            out.append(Candidate.model_validate(it))
        except ValidationError as exc:
            e = exc.errors()[0]
            raise ConfigError(f"--grid {path}: candidates[{i}].{'.'.join(map(str, e['loc']))}: {e['msg']}") from None
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"--grid {path}: candidate names must be unique ({names})")
    return out


def candidate_args(base: QualityArgs, c: Candidate) -> QualityArgs:
    """The base arguments with the candidate's overrides applied."""
    upd = {k: v for k, v in c.model_dump().items() if k not in ("name", "method") and v is not None}
    return replace(base, **upd)


def selection_score(curve: Sequence[dict], smooth: int) -> float:
    """Mean validation balanced accuracy over the last ``smooth`` rounds (the selection criterion)."""
    vals = [c["val_balanced_accuracy"] for c in curve if c.get("val_balanced_accuracy") is not None]
    if not vals:
        raise ConfigError("recipe selection needs validation scores: set --val-per-task > 0")
    tail = vals[-max(1, smooth):]
    return float(sum(tail) / len(tail))


def run_recipe_selection(base: QualityArgs, grid: Sequence[Candidate], setting: str, seed: int = 0,
                         smooth: int = 2) -> dict:
    """Federate every candidate (cached per candidate under ``base.out/recipe``), pick the best on validation.

    Returns and writes ``recipe.json`` (every curve, wall time, score and the choice) and ``recipe.png``.
    """
    from fedproxy_secure.pipelines.simulate import federate

    if base.val_per_task <= 0:
        raise ConfigError("--val-per-task: recipe selection scores a validation split; give it > 0 examples per task")
    out = Path(base.out)
    (out / "recipe").mkdir(parents=True, exist_ok=True)
    tasks = list(base.tasks) if base.tasks else None
    shared: _Shared | None = None
    results: dict[str, dict] = {}
    for c in grid:
        f = out / "recipe" / f"{setting}__{c.name}__s{seed}.json"
        if f.is_file():
            results[c.name] = json.loads(f.read_text())
            base.log(f"recipe {c.name}: cached")
            continue
        a = candidate_args(base, c)
        if shared is None:
            from fedproxy_secure.data import list_tasks

            tasks = tasks or list_tasks(base.data_dir)
            shared = _Shared(base, setting, tasks)
        shared.a = a
        t0 = time.time()
        outcome = federate(_run_config(a, setting, c.method, seed), shared.prepared(c.method, seed),
                           out / "work" / f"recipe__{c.name}", log=base.log,
                           on_round=lambda r, model: {"val_balanced_accuracy": shared.val_score(model)})
        curve = round_curve(outcome.rounds)
        res = {"candidate": c.model_dump(), "curve": curve, "seconds": round(time.time() - t0, 1),
               "score": selection_score(curve, smooth)}
        f.write_text(json.dumps(res, default=_json_default))
        base.log(f"recipe {c.name}: validation {res['score']:.3f} in {res['seconds']:.0f} s")
        results[c.name] = res
    chosen = max(results, key=lambda n: results[n]["score"])
    summary = {"setting": setting, "seed": seed, "smooth": smooth, "chosen": chosen,
               "criterion": f"mean validation balanced accuracy of the global proxy over the last {smooth} rounds",
               "candidates": results, "args": _portable_args(base)}
    (out / "recipe.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    plot_recipes(results, out / "recipe.png", chosen)
    return summary


def plot_recipes(results: dict[str, dict], path: Path, chosen: str) -> Path:
    """recipe.png: validation balanced accuracy per round of every candidate (the chosen one bold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        xs = [c["round"] for c in r["curve"]]
        ys = [100 * c["val_balanced_accuracy"] for c in r["curve"]]
        ax.plot(xs, ys, "o-", lw=2.5 if name == chosen else 1.0, label=name + (" (chosen)" if name == chosen else ""))
    ax.set_xlabel("round")
    ax.set_ylabel("validation balanced accuracy of the global proxy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
