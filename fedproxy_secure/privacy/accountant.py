"""Privacy accounting with opacus' PRV accountant (Gopi et al. 2021).

A plan is ``planned_rounds × local_steps`` Poisson-subsampled Gaussian steps at sample rate
``q = batch_size / n_examples``. The noise multiplier is the smallest σ (opacus binary search) whose
ε(δ) after the whole plan is at most the target. ε spent is the PRV upper bound over the recorded
history ``[(σ, q, steps), ...]``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

ACCOUNTANT_NAME = "prv"


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, total_steps: int) -> float:
    """σ such that ``total_steps`` steps at ``sample_rate`` spend at most ``target_epsilon`` at ``delta`` (PRV).

    Pure and cached (the PRV binary search takes seconds; every round of a plan asks the same question).
    """
    return _noise_multiplier(float(target_epsilon), float(delta), float(sample_rate), int(total_steps))


@lru_cache(maxsize=64)
def _noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, total_steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    if not 0 < sample_rate <= 1:
        raise ValueError(f"dp: sample rate {sample_rate!r} must be in (0, 1]; use batch_size <= number of examples")
    if total_steps < 1:
        raise ValueError("dp: the plan needs at least one step")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=int(total_steps), accountant=ACCOUNTANT_NAME, epsilon_tolerance=0.01))


def epsilon_spent(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε(δ) upper bound (PRV) after every ``(noise_multiplier, sample_rate, steps)`` entry; 0.0 if empty."""
    from opacus.accountants import PRVAccountant

    merged: dict[tuple[float, float], int] = {}
    for s, q, k in history:  # composition is commutative: same (σ, q) entries add their steps
        if int(k) > 0:
            merged[(float(s), float(q))] = merged.get((float(s), float(q)), 0) + int(k)
    if not merged:
        return 0.0
    acc = PRVAccountant()
    acc.history = [(s, q, k) for (s, q), k in sorted(merged.items())]
    return float(acc.get_epsilon(delta=delta))
