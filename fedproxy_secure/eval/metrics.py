"""Per-task accuracy and balanced accuracy, prior-only and chance baselines (pure functions).

Rules (documented once, used by every table):

* **Credit.** An example's credit is 1 when the gold option has the strictly highest score; with
  ties at the top it is ``1 / (number of tied options)`` if gold is among them (uniform tie-break in
  expectation), else 0. A row of equal scores therefore scores exactly like chance.
* **Fixed-label task.** A task is fixed-label when every test example offers the same *set* of
  option texts (e.g. yes/no, three NLI labels). Its balanced accuracy is the mean, over the gold
  labels present in the test set, of the mean credit of the examples with that gold label (mean
  recall per gold label). A task whose options change from example to example has no label set to
  balance: its balanced accuracy *is* its accuracy.
* **Prior-only.** Fixed-label task: always answer the TRAINING split's majority gold label (ties:
  the label that sorts first). Per-example-option task: answer the training split's most common
  gold answer text when it is one of the example's options; otherwise the example scores like chance
  (``1 / n_options``).
* **Chance.** Uniform random choice: credit ``1 / n_options`` per example.
* **Headline.** The macro mean over tasks of balanced accuracy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


def credit(scores: Sequence[float], gold: int) -> float:
    """1 if ``gold`` is the unique argmax of ``scores``, ``1/k`` if it ties with k-1 others at the top, else 0."""
    s = np.asarray(scores, dtype=float)
    if not 0 <= gold < len(s):
        raise ValueError(f"gold: index {gold} outside the {len(s)} options")
    top = s == s.max()
    return float(top[gold]) / float(top.sum())


def is_fixed_label(option_sets: Sequence[Sequence[str]]) -> bool:
    """True when every example offers the same set of option texts (order ignored)."""
    sets = {frozenset(o) for o in option_sets}
    return len(sets) == 1


@dataclass(frozen=True)
class TaskView:
    """One task's test set as the metrics need it: options and gold index per example, in a fixed order."""

    options: tuple[tuple[str, ...], ...]
    gold: tuple[int, ...]

    @property
    def fixed_label(self) -> bool:
        """Whether balanced accuracy averages recall over gold labels (see the module rules)."""
        return is_fixed_label(self.options)

    def groups(self) -> np.ndarray:
        """Stratum of every example: the gold label's id for fixed-label tasks, else 0 for all."""
        if not self.fixed_label:
            return np.zeros(len(self.gold), dtype=int)
        labels = sorted({o[g] for o, g in zip(self.options, self.gold)})
        ids = {t: i for i, t in enumerate(labels)}
        return np.array([ids[o[g]] for o, g in zip(self.options, self.gold)], dtype=int)


def credits(view: TaskView, scores: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-example credit of one method on one task (``scores`` in the view's example order)."""
    if len(scores) != len(view.gold):
        raise ValueError(f"scores: {len(scores)} rows for {len(view.gold)} examples")
    return np.array([credit(s, g) for s, g in zip(scores, view.gold)], dtype=float)


def grouped_mean(values: np.ndarray, groups: np.ndarray) -> float:
    """Mean over the groups present of each group's mean value (balanced accuracy when values are credits)."""
    ids = np.unique(groups)
    return float(np.mean([values[groups == g].mean() for g in ids])) if len(ids) else float("nan")


def task_metrics(view: TaskView, credit_values: np.ndarray) -> dict:
    """``{"accuracy", "balanced_accuracy", "n", "fixed_label"}`` of one method on one task."""
    return {"accuracy": float(np.mean(credit_values)) if len(credit_values) else float("nan"),
            "balanced_accuracy": grouped_mean(credit_values, view.groups()),
            "n": len(credit_values), "fixed_label": view.fixed_label}


def chance_scores(view: TaskView) -> list[list[float]]:
    """All-equal scores: credit ``1/n_options`` per example."""
    return [[0.0] * len(o) for o in view.options]


def training_prior(train_answers: Sequence[str]) -> str | None:
    """The most common training gold answer text (ties: the one that sorts first); None if no training data."""
    if not train_answers:
        return None
    counts = Counter(train_answers)
    best = max(counts.values())
    return sorted(t for t, c in counts.items() if c == best)[0]


def prior_only_scores(view: TaskView, prior: str | None) -> list[list[float]]:
    """One-hot scores on ``prior`` where it is an option; all-equal (chance) elsewhere."""
    return [[1.0 if o == prior else 0.0 for o in opts] for opts in view.options]


def macro_mean(per_task: Mapping[str, Mapping[str, float]], key: str = "balanced_accuracy") -> float:
    """Unweighted mean of ``key`` over tasks (the headline with the default key)."""
    vals = [m[key] for m in per_task.values()]
    return float(np.mean(vals)) if vals else float("nan")
