"""Balanced accuracy, prior-only and chance on hand-made predictions (the rules in eval.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedproxy_secure.eval.metrics import (
    TaskView, chance_scores, credit, credits, is_fixed_label, prior_only_scores, task_metrics, training_prior,
)

YN = ("yes", "no")


def test_credit_unique_argmax_and_ties() -> None:
    assert credit([0.1, 0.9], 1) == 1.0 and credit([0.1, 0.9], 0) == 0.0
    assert credit([0.5, 0.5, 0.1], 0) == 0.5 and credit([0.5, 0.5, 0.1], 2) == 0.0
    assert credit([0.0, 0.0, 0.0, 0.0], 3) == 0.25
    with pytest.raises(ValueError, match="gold"):
        credit([0.1, 0.2], 2)


def test_balanced_accuracy_majority_answer_is_not_rewarded() -> None:
    # 8 "yes" and 2 "no" golds; a model that always answers "yes" gets 80 % accuracy but 50 % balanced
    view = TaskView((YN,) * 10, (0,) * 8 + (1,) * 2)
    always_yes = [[1.0, 0.0]] * 10
    m = task_metrics(view, credits(view, always_yes))
    assert m["fixed_label"] and m["n"] == 10
    assert math.isclose(m["accuracy"], 0.8) and math.isclose(m["balanced_accuracy"], 0.5)
    # one "no" right and 6 of 8 "yes" right: recall yes 0.75, recall no 0.5
    scores = [[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 2 + [[0.0, 1.0], [1.0, 0.0]]
    m = task_metrics(view, credits(view, scores))
    assert math.isclose(m["accuracy"], 0.7) and math.isclose(m["balanced_accuracy"], (0.75 + 0.5) / 2)


def test_fixed_label_ignores_option_order_and_groups_by_gold_text() -> None:
    view = TaskView((("yes", "no"), ("no", "yes"), ("yes", "no")), (0, 1, 1))  # golds: yes, yes, no
    assert view.fixed_label and list(view.groups()) == [1, 1, 0]  # labels sorted: no=0, yes=1
    assert not is_fixed_label([("a", "b"), ("c", "d")])


def test_per_example_options_keep_accuracy() -> None:
    view = TaskView((("a", "b", "c"), ("d", "e", "f"), ("g", "h", "i"), ("j", "k", "l")), (0, 0, 0, 2))
    m = task_metrics(view, credits(view, [[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]]))
    assert not m["fixed_label"] and m["accuracy"] == m["balanced_accuracy"] == 0.75


def test_prior_only_fixed_labels_uses_training_majority() -> None:
    prior = training_prior(["no", "yes", "no", "no"])
    assert prior == "no" and training_prior(["b", "a", "a", "b"]) == "a" and training_prior([]) is None
    # test set: 3 yes, 1 no
    view = TaskView((YN, ("no", "yes"), YN, YN), (0, 1, 0, 1))  # golds: yes, yes, yes, no
    m = task_metrics(view, credits(view, prior_only_scores(view, prior)))
    assert math.isclose(m["accuracy"], 0.25) and math.isclose(m["balanced_accuracy"], 0.5)


def test_prior_only_per_example_options_scores_like_chance_when_absent() -> None:
    view = TaskView((("red", "blue"), ("green", "red", "pink", "gold"), ("cyan", "teal", "navy", "lime")), (0, 2, 1))
    c = credits(view, prior_only_scores(view, "red"))
    # ex0: red is gold -> 1; ex1: red is an option but wrong -> 0; ex2: red absent -> chance 1/4
    assert list(c) == [1.0, 0.0, 0.25]


def test_chance_is_one_over_options() -> None:
    view = TaskView((("a", "b"), ("c", "d", "e", "f")), (1, 3))
    c = credits(view, chance_scores(view))
    assert list(c) == [0.5, 0.25] and math.isclose(task_metrics(view, c)["accuracy"], np.mean([0.5, 0.25]))
