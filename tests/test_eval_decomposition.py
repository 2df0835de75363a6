"""Stage decomposition (stage-ii efficiency, stage-iii transfer, recovery) on hand-made predictions."""

from __future__ import annotations

import pytest

from fedproxy_secure.eval.decomposition import stage_decomposition

N_PER_LABEL = 10


def _rows(method: str, correct_per_label: int, seed: int = 0) -> list[dict]:
    """20 examples of a 2-label task; the first ``correct_per_label`` of each label scored right."""
    rows = []
    for lab in (0, 1):
        for j in range(N_PER_LABEL):
            ok = j < correct_per_label
            scores = [1.0, 0.0] if (lab == 0) == ok else [0.0, 1.0]
            rows.append({"method": method, "seed": seed, "task": "t", "example_id": lab * N_PER_LABEL + j, "gold": lab,
                         "options": ["no", "yes"], "scores": scores})
    return rows


def _table(**correct: int) -> list[dict]:
    return [r for m, k in correct.items() for r in _rows(m.replace("__", "@"), k)]


def test_ratios_match_the_hand_computed_values() -> None:
    rows = _table(zs_llm=5, centralized=9, centralized_proxy=7, zs_proxy=5, centralized_proxy__proxy=9,
                  fedavg__proxy=7, fedavg=6)
    d = stage_decomposition(rows, ["fedavg"], n_boot=300)
    assert d["headlines"]["zs_llm"] == pytest.approx(0.5) and d["headlines"]["centralized"] == pytest.approx(0.9)
    assert d["stage_iii_transfer"]["value"] == pytest.approx(0.5)       # (0.7 - 0.5) / (0.9 - 0.5)
    m = d["methods"]["fedavg"]
    assert m["stage_ii_efficiency"]["value"] == pytest.approx(0.5)      # (0.7 - 0.5) / (0.9 - 0.5)
    assert m["recovery"]["value"] == pytest.approx(0.25)                # (0.6 - 0.5) / (0.9 - 0.5)
    lo, hi = m["recovery"]["ci"]
    assert lo <= 0.25 <= hi and hi - lo > 0                             # a real interval around the value


def test_a_method_that_learned_nothing_has_zero_efficiency_and_missing_inputs_are_named() -> None:
    rows = _table(zs_llm=5, centralized=9, zs_proxy=5, centralized_proxy__proxy=9, fedavg__proxy=5, fedavg=5)
    d = stage_decomposition(rows, ["fedavg"], n_boot=200)
    assert d["methods"]["fedavg"]["stage_ii_efficiency"]["value"] == pytest.approx(0.0)
    assert d["stage_iii_transfer"]["value"] is None and d["stage_iii_transfer"]["missing"] == ["centralized_proxy"]


def test_seeds_are_averaged_per_example() -> None:
    rows = _table(zs_llm=5, centralized=9, zs_proxy=5, centralized_proxy__proxy=9, centralized_proxy=9, fedavg__proxy=9)
    rows += _rows("fedavg", 5, seed=0) + _rows("fedavg", 9, seed=1)     # seed mean headline 0.7
    d = stage_decomposition(rows, ["fedavg"], n_boot=200)
    assert d["methods"]["fedavg"]["recovery"]["value"] == pytest.approx(0.5)
