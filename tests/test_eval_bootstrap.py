"""Paired stratified bootstrap: intervals cover a known difference about 95 % of the time, and are paired."""

from __future__ import annotations

import numpy as np

from fedproxy_secure.eval.bootstrap import paired_bootstrap


def _simulate(rng: np.random.Generator, n: int, p_ref: np.ndarray, p_m: np.ndarray, rho: float = 0.5):
    """One dataset: 2 tasks x 2 gold labels, ``n`` examples per label; correctness of the two methods
    is correlated (paired) with per-label success probabilities ``p_ref`` / ``p_m``."""
    credits = {"ref": {}, "m": {}}
    groups = {}
    for t in range(2):
        g = np.repeat([0, 1], n)
        u = rng.random(2 * n)
        v = np.where(rng.random(2 * n) < rho, u, rng.random(2 * n))  # shared latent difficulty
        credits["ref"][f"t{t}"] = (u < p_ref[t][g]).astype(float)
        credits["m"][f"t{t}"] = (v < p_m[t][g]).astype(float)
        groups[f"t{t}"] = g
    return credits, groups


def test_bootstrap_ci_covers_known_difference_near_95_percent() -> None:
    rng = np.random.default_rng(1)
    p_ref = np.array([[0.6, 0.4], [0.7, 0.5]])
    p_m = np.array([[0.7, 0.6], [0.75, 0.55]])
    true_diff = float((p_m.mean(axis=1) - p_ref.mean(axis=1)).mean())  # macro balanced accuracy difference
    sims, hit = 300, 0
    for i in range(sims):
        cr, gr = _simulate(rng, 80, p_ref, p_m)
        ci = paired_bootstrap(cr, gr, reference="ref", n_boot=400, seed=i)["m"]["diff_ci"]
        hit += ci[0] <= true_diff <= ci[1]
    coverage = hit / sims
    assert 0.90 <= coverage <= 0.99, coverage


def test_bootstrap_is_paired_deterministic_and_ratio_defined() -> None:
    rng = np.random.default_rng(0)
    cr, gr = _simulate(rng, 50, np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([[0.8, 0.8], [0.8, 0.8]]))
    cr["same"] = {t: v.copy() for t, v in cr["ref"].items()}
    cr["up"] = {t: np.ones_like(v) for t, v in cr["ref"].items()}
    a = paired_bootstrap(cr, gr, reference="ref", upper="up", n_boot=300, seed=7)
    b = paired_bootstrap(cr, gr, reference="ref", upper="up", n_boot=300, seed=7)
    assert a == b
    assert a["same"]["diff_ci"] == [0.0, 0.0]  # identical credits: every paired replicate differs by 0
    assert a["up"]["ratio_ci"] == [1.0, 1.0] and a["ref"]["ratio_ci"] == [0.0, 0.0]
    lo, hi = a["m"]["ratio_ci"]
    assert 0.0 < lo < hi < 1.0
