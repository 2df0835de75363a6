"""Paired, stratified bootstrap confidence intervals for the macro balanced accuracy (pure numpy).

One resample draws, for every task and every stratum (gold label for fixed-label tasks, the whole
task otherwise), that stratum's examples with replacement. The SAME draw is applied to every method
(paired), so differences and ratios are computed replicate by replicate. Percentile intervals.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def resampled_headlines(credit_by_method: Mapping[str, Mapping[str, np.ndarray]],
                         groups: Mapping[str, np.ndarray], n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """``{method: (n_boot,) macro balanced accuracy}`` over paired stratified resamples (the same draw for
    every method, so any function of several methods' headlines is computed replicate by replicate)."""
    rng = np.random.default_rng(seed)
    tasks = sorted(groups)
    out = {m: np.zeros(n_boot) for m in credit_by_method}
    for t in tasks:
        g = np.asarray(groups[t])
        strata = [np.flatnonzero(g == s) for s in np.unique(g)]
        draws = [idx[rng.integers(0, len(idx), size=(n_boot, len(idx)))] for idx in strata]
        for m, per_task in credit_by_method.items():
            c = np.asarray(per_task[t], dtype=float)
            task_bal = np.mean([c[d].mean(axis=1) for d in draws], axis=0)
            out[m] += task_bal / len(tasks)
    return out


def percentile_interval(x: np.ndarray, level: float) -> list[float]:
    """The central ``level`` percentile interval of the finite values of ``x`` ([nan, nan] if none)."""
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return [float("nan"), float("nan")]
    a = (1.0 - level) / 2.0
    return [float(np.quantile(x, a)), float(np.quantile(x, 1.0 - a))]


def paired_bootstrap(credit_by_method: Mapping[str, Mapping[str, np.ndarray]], groups: Mapping[str, np.ndarray], *,
                     reference: str, upper: str | None = None, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, dict]:
    """CIs of each method's headline, its difference to ``reference`` and its ratio
    ``(m - reference) / (upper - reference)`` (recovery or transfer) when ``upper`` is given.

    ``credit_by_method[m][task]`` are per-example credits aligned across methods (average them over
    seeds first for a multi-seed mean). Guarantees: deterministic for a given ``seed``; every method
    sees the same resample; a replicate whose denominator is 0 is dropped from the ratio's interval
    (its count is reported as ``ratio_undefined``).
    """
    if reference not in credit_by_method:
        raise KeyError(f"reference: method {reference!r} has no predictions")
    boot = resampled_headlines(credit_by_method, groups, n_boot, seed)
    ref = boot[reference]
    out: dict[str, dict] = {}
    for m, b in boot.items():
        row = {"headline_ci": percentile_interval(b, level), "diff_ci": percentile_interval(b - ref, level)}
        if upper is not None and upper in boot:
            den = boot[upper] - ref
            ok = np.abs(den) > 1e-12
            ratio = np.where(ok, (b - ref) / np.where(ok, den, 1.0), np.nan)
            row["ratio_ci"] = percentile_interval(ratio, level)
            row["ratio_undefined"] = int((~ok).sum())
        out[m] = row
    return out
