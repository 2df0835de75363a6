"""TIES-merging (Yadav et al., NeurIPS 2023) applied to client updates.

1. Trim: keep each update's top ``k = max(1, ⌊density·P⌋)`` coordinates by magnitude (density 0.2
   default, i.e. the top 20%), zero the rest.
2. Elect sign: ``γ_p = sgn(Σ_i Δ̃_i,p)`` (the sign with the larger total mass).
3. Disjoint mean: ``Δ*_p = Σ_{i: sgn Δ̃_i,p = γ_p} Δ̃_i,p / |{i: sgn Δ̃_i,p = γ_p}|`` (0 if none).
Unweighted, as in the paper; ``num_examples`` is only validated. Needs individual updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fedproxy_secure.aggregate.base import AggResult, AggState, require
from fedproxy_secure.aggregate.validate import check_num_examples, check_updates

DEFAULT_TIES_DENSITY = 0.2


def keep_count(fraction: float, p: int) -> int:
    """``⌊fraction·P⌋`` robust to float error (0.8·10000 -> 8000), clipped to ``[0, P]``."""
    return int(min(p, max(0, math.floor(fraction * p + 1e-9))))


def trim_top(delta: np.ndarray, k: int) -> np.ndarray:
    """Return a copy of ``delta`` keeping only its ``k`` largest-magnitude coordinates (others 0).

    Deterministic (ties broken by ``np.argpartition`` on the same input give the same result).
    ``k >= P`` keeps everything; ``k <= 0`` gives zeros.
    """
    p = delta.size
    if k >= p:
        return delta.copy()
    out = np.zeros_like(delta)
    if k <= 0:
        return out
    idx = np.argpartition(-np.abs(delta), k - 1)[:k]
    out[idx] = delta[idx]
    return out


def ties(updates: Sequence[np.ndarray], density: float = DEFAULT_TIES_DENSITY) -> np.ndarray:
    """Return the TIES merge (trim, elect sign, disjoint mean) of the updates.

    Guarantees: identical updates give that update trimmed to its top ``density`` share; two exactly
    opposite updates give 0; a single client gives its trimmed update.
    """
    require(0 < density <= 1, "density", density, "the TIES density must be in (0, 1] (0.2 = keep top 20%)")
    ups = check_updates(updates)
    k = max(1, keep_count(density, ups[0].size))
    trimmed = np.stack([trim_top(u, k) for u in ups])
    gamma = np.sign(trimmed.sum(axis=0))
    agree = (np.sign(trimmed) == gamma) & (trimmed != 0)
    cnt = agree.sum(axis=0)
    tot = np.where(agree, trimmed, 0.0).sum(axis=0)
    return np.divide(tot, cnt, out=np.zeros_like(tot), where=cnt > 0)


@dataclass
class TiesAggregator:
    """TIES behind the :class:`Aggregator` interface (needs every update in the clear)."""

    density: float = DEFAULT_TIES_DENSITY
    name: str = "ties"
    needs_individual_updates: bool = True

    def __post_init__(self) -> None:
        require(0 < self.density <= 1, "density", self.density, "must be in (0, 1] (0.2 = keep top 20%)")

    def aggregate(self, updates: Sequence[np.ndarray], num_examples: Sequence[int], state: AggState) -> AggResult:
        """TIES merge; ``conflict`` is None (no PCR for this baseline)."""
        ups = check_updates(updates)
        check_num_examples(num_examples, len(ups), need_positive_total=False)
        delta = ties(ups, self.density)
        return AggResult(delta=delta, conflict=None, info={
            "aggregator": self.name, "num_clients": len(ups), "density": float(self.density),
            "zero_fraction": float(np.mean(delta == 0)), "delta_norm": float(np.linalg.norm(delta)),
        })
