"""FedAvg (McMahan et al. 2017): the example-weighted mean of the client updates.

``delta = Σ_i n_i Δ_i / Σ_i n_i``. It is a sum, so it runs under secure aggregation: each client
submits ``(n_i / N) Δ_i`` with ``N = Σ_j n_j`` public (example counts are announced in the clear),
whose magnitude is at most ``|Δ_i|`` coordinate-wise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fedproxy_secure.aggregate.base import AggResult, AggState, SecureSumFn, jsonable_floats, plain_sum
from fedproxy_secure.aggregate.validate import check_num_examples, check_updates


def fedavg(updates: Sequence[np.ndarray], num_examples: Sequence[int] | None = None) -> np.ndarray:
    """Return ``Σ_i n_i Δ_i / Σ_i n_i`` (uniform weights when ``num_examples`` is None).

    Guarantees: a new float64 ``(P,)`` array; identical updates give that update; a single client
    gives its update. Raises ``DataError`` on malformed updates or counts (all-zero counts included).
    """
    ups = check_updates(updates)
    n = np.ones(len(ups)) if num_examples is None else check_num_examples(num_examples, len(ups), need_positive_total=True)
    w = n / n.sum()
    out = np.zeros_like(ups[0])
    for wi, u in zip(w, ups):
        out += wi * u
    return out


@dataclass
class FedAvgAggregator:
    """FedAvg behind the :class:`Aggregator` interface; sum-only, so ``secure_sum`` may be any summer."""

    secure_sum: SecureSumFn = plain_sum
    name: str = "fedavg"
    needs_individual_updates: bool = False

    def aggregate(self, updates: Sequence[np.ndarray], num_examples: Sequence[int], state: AggState) -> AggResult:
        """Example-weighted mean computed as one secure sum of ``(n_i/N) Δ_i``; ``conflict`` is None."""
        ups = check_updates(updates)
        n = check_num_examples(num_examples, len(ups), need_positive_total=True)
        w = n / n.sum()
        delta = np.asarray(self.secure_sum([wi * u for wi, u in zip(w, ups)]), dtype=np.float64)
        return AggResult(delta=delta, conflict=None, info={
            "aggregator": self.name, "num_clients": len(ups), "weights": jsonable_floats(w),
            "delta_norm": float(np.linalg.norm(delta)),
        })


def fedavg_from_sum(total: np.ndarray, total_weight: float) -> np.ndarray:
    """FedAvg's step from a secure sum: ``Σ_i w_i Δ_i / Σ_i w_i`` given both sums.

    With unit weights (``total_weight`` = number of survivors) this is the unweighted mean; with
    example counts pre-multiplied by the clients it is the example-weighted mean. Guarantees a new
    float64 array; raises ``DataError`` unless ``total_weight`` is positive and finite.
    """
    from fedproxy_secure.errors import DataError

    w = float(total_weight)
    if not np.isfinite(w) or w <= 0:
        raise DataError(f"fedavg_from_sum: total weight {total_weight!r} must be positive; check the survivors")
    return np.asarray(total, dtype=np.float64) / w
