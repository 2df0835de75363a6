"""Example-weighted FedAvg under secure aggregation: what a client sums, and what the server reads back.

With ``federation.weighting: examples`` the signed round config carries ``weighting: {by: examples,
max_examples: C}``. Client ``i`` with ``n_i`` examples sends ``(w_i / √2) · [Δ_i, clip]`` where
``w_i = min(n_i, C) / C`` ∈ (0, 1]: ``P + 1`` values, every one within ``[-clip, clip]`` and the L2
norm at most ``w_i · clip`` (so every mode's range and norm checks hold unchanged). The secure sum
then gives ``Σ w_i Δ_i / √2`` and ``Σ w_i · clip / √2``, and the server's step is
``Σ w_i Δ_i / Σ w_i``, the example-weighted mean (in-process FedAvg, with counts capped at ``C``).
Choose ``C`` near the largest site's count: the sum's absolute noise (HE flooding, fixed-point
rounding) is divided by ``Σ w_i``. The server learns only the survivors' total weight ``Σ w_i`` (no
example count is in a client report: ``protocol/client_report.py``); no single ``w_i Δ_i`` is revealed.
"""

from __future__ import annotations

import math

import numpy as np

from fedproxy_secure.errors import ProtocolAbort

__all__ = ["weighted_input", "split_weighted_sum", "round_weighting"]

_SCALE = 1.0 / math.sqrt(2.0)


def round_weighting(cfg: dict) -> int | None:
    """``max_examples`` of a round config asking for example weights, None for uniform weights."""
    w = cfg.get("weighting")
    if w is None:
        return None
    if not isinstance(w, dict) or w.get("by") != "examples" or not isinstance(w.get("max_examples"), int) \
            or isinstance(w.get("max_examples"), bool) or w["max_examples"] < 1:
        raise ProtocolAbort(f"round config: weighting {w!r} is not {{by: examples, max_examples: int >= 1}}")
    return int(w["max_examples"])


def weighted_input(vector: np.ndarray, num_examples: int, max_examples: int, clip_norm: float) -> np.ndarray:
    """``(w / √2) · [vector, clip_norm]`` with ``w = min(num_examples, max_examples) / max_examples``.

    Raises ``ProtocolAbort`` unless ``num_examples`` is an int >= 1. Pure function.
    """
    if not isinstance(num_examples, (int, np.integer)) or isinstance(num_examples, bool) or num_examples < 1:
        raise ProtocolAbort(f"example-weighted round: num_examples={num_examples!r} must be an int >= 1")
    w = min(int(num_examples), int(max_examples)) / int(max_examples)
    v = np.asarray(vector, dtype=np.float64).ravel()
    return (w * _SCALE) * np.concatenate([v, [float(clip_norm)]])


def split_weighted_sum(total: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """``(Σ w_i Δ_i, Σ w_i)`` from the secure sum of :func:`weighted_input` vectors. Pure function."""
    t = np.asarray(total, dtype=np.float64)
    return t[:-1] / _SCALE, float(t[-1] / _SCALE / float(clip_norm))
