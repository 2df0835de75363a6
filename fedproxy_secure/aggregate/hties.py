"""H-TIES: heterogeneity-aware, interference-mitigating aggregation (FedProxy, DESIGN §1 stage ii).

For K client updates ``Δ_i ∈ R^P``:

1. ``S_ij = cos(Δ_i, Δ_j)``; ``h_i = 1 - Σ_{j≠i} max(S_ij, 0)/(K-1)``; ``ĥ = minmax(h)`` (0 if h is
   constant); ``w = softmax_i(Σ_{j≠i} |S_ij|)``.
2. retention ``r_i = clip(r0 - δ·ĥ_i, 0, 1)``; ``Δ̃_i`` keeps the top ``⌊r_i·P⌋`` coordinates of
   ``Δ_i`` by magnitude.
3. per coordinate, ``u_i = w_i Δ̃_i``, ``P+ = Σ_{u>0} |u_i|``, ``P- = Σ_{u<0} |u_i|``:
   if ``P+/(P-+ε) ≥ ρ``: ``Δ* = Σ_{u>0} u_i / Σ_{u>0} w_i``; elif ``P-/(P++ε) ≥ ρ``: the same over the
   negatives; else ``Δ* = 0``.
4. ``C_p = 1 - |Σ_i sgn(Δ_i,p)| / K`` on the untrimmed updates (sent to clients for PCR).

Defined edge cases: a zero update has cosine 0 with everyone (Δ̂ = 0), weight from its zero
similarity sum, contributes nothing to ``u`` and sign 0 to ``C``. A single client (K = 1): no pairs,
``h = 0``, ``w = 1``, so ``Δ* = Δ̃_1`` (= Δ_1 with r0 = 1) and ``C = 1 - |sgn Δ_1|``.
Defaults: r0 = 1.0, δ = 0.2, ρ = 1.1, ε = 1e-12.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from fedproxy_secure.aggregate.base import AggResult, AggState, jsonable_floats, require
from fedproxy_secure.aggregate.ties import keep_count, trim_top
from fedproxy_secure.aggregate.validate import check_num_examples, check_updates

H_NORM_CHOICES = ("reveal", "none")


@dataclass(frozen=True)
class HTiesParams:
    """Hyper-parameters of H-TIES and SA-H-TIES (validated; ``ConfigError`` names the bad field).

    ``h_norm`` is used by SA-H-TIES only: ``"reveal"`` (each client reveals its scalar h_i so the
    server can min-max normalise) or ``"none"`` (unnormalised h_i, nothing revealed).
    """

    r0: float = 1.0
    delta: float = 0.2
    rho: float = 1.1
    eps: float = 1e-12
    h_norm: str = "reveal"

    def __post_init__(self) -> None:
        require(0 <= self.r0 <= 1, "r0", self.r0, "base retention must be in [0, 1] (default 1.0)")
        require(self.delta >= 0, "delta", self.delta, "retention slope must be >= 0 (default 0.2)")
        require(self.rho >= 1, "rho", self.rho, "sign-election gate must be >= 1 (default 1.1)")
        require(self.eps > 0, "eps", self.eps, "must be > 0 (default 1e-12)")
        require(self.h_norm in H_NORM_CHOICES, "h_norm", self.h_norm, f"use one of {H_NORM_CHOICES}")


def normalise_rows(ups: Sequence[np.ndarray]) -> np.ndarray:
    """Return the ``(K, P)`` stack of ``Δ_i/‖Δ_i‖``; zero updates stay zero rows."""
    x = np.stack(ups)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def pairwise_cosine(ups: Sequence[np.ndarray]) -> np.ndarray:
    """``S_ij = cos(Δ_i, Δ_j)`` as a ``(K, K)`` matrix in ``[-1, 1]``; 0 wherever a zero update is involved."""
    x = normalise_rows(ups)
    return np.clip(x @ x.T, -1.0, 1.0)


def heterogeneity(s: np.ndarray) -> np.ndarray:
    """``h_i = 1 - Σ_{j≠i} max(S_ij, 0)/(K-1)`` in ``[0, 1]``; ``h = [0]`` when K = 1."""
    k = s.shape[0]
    if k == 1:
        return np.zeros(1)
    off = s - np.diag(np.diag(s))
    return np.clip(1.0 - np.maximum(off, 0.0).sum(axis=1) / (k - 1), 0.0, 1.0)


def minmax(h: np.ndarray) -> np.ndarray:
    """Min-max normalise to ``[0, 1]``; all zeros when ``h`` is constant (max - min ≤ 1e-12)."""
    lo, hi = float(np.min(h)), float(np.max(h))
    if hi - lo <= 1e-12:
        return np.zeros_like(h)
    return np.clip((h - lo) / (hi - lo), 0.0, 1.0)


def similarity_weights(s: np.ndarray) -> np.ndarray:
    """``w = softmax_i(Σ_{j≠i} |S_ij|)``: positive, sums to 1 (stable: max-shifted)."""
    off = np.abs(s - np.diag(np.diag(s))).sum(axis=1)
    e = np.exp(off - off.max())
    return e / e.sum()


def retention(h_hat: np.ndarray, r0: float, delta: float) -> np.ndarray:
    """``r_i = clip(r0 - δ·ĥ_i, 0, 1)``: the share of coordinates client i keeps."""
    return np.clip(r0 - delta * np.asarray(h_hat, dtype=np.float64), 0.0, 1.0)


def gated_merge(pos_sum: np.ndarray, neg_sum: np.ndarray, wpos_sum: np.ndarray, wneg_sum: np.ndarray,
                rho: float, eps: float) -> np.ndarray:
    """The ρ-gated sign election of H-TIES from four per-coordinate sums.

    ``pos_sum = Σ max(u_i,0) (= P+)``, ``neg_sum = Σ min(u_i,0) (= -P-)``, ``wpos_sum = Σ w_i 1[u_i>0]``,
    ``wneg_sum = Σ w_i 1[u_i<0]``. Returns ``pos_sum/wpos_sum`` where ``P+/(P-+ε) ≥ ρ``,
    ``neg_sum/wneg_sum`` where ``P-/(P++ε) ≥ ρ`` (and not the former), else 0; 0 also wherever the
    chosen weight sum is ≤ 0 (possible only from encoding noise in a secure sum).
    """
    p_plus = np.maximum(pos_sum, 0.0)
    p_minus = np.maximum(-neg_sum, 0.0)
    take_pos = p_plus / (p_minus + eps) >= rho
    take_neg = (~take_pos) & (p_minus / (p_plus + eps) >= rho)
    out = np.zeros_like(p_plus)
    ok = take_pos & (wpos_sum > 0)
    out[ok] = pos_sum[ok] / wpos_sum[ok]
    ok = take_neg & (wneg_sum > 0)
    out[ok] = neg_sum[ok] / wneg_sum[ok]
    return out


def conflict_from_sign_sum(sign_sum: np.ndarray, k: int) -> np.ndarray:
    """``C_p = 1 - |Σ_i sgn(Δ_i,p)| / K``, clipped to ``[0, 1]`` (robust to encoding noise)."""
    return np.clip(1.0 - np.abs(sign_sum) / k, 0.0, 1.0)


@dataclass
class HTiesOutput:
    """Everything plaintext H-TIES computes (for tests and the departure benchmark)."""

    delta: np.ndarray
    conflict: np.ndarray
    cosine: np.ndarray
    h: np.ndarray
    h_hat: np.ndarray
    weights: np.ndarray
    retention: np.ndarray


def hties(updates: Sequence[np.ndarray], params: HTiesParams | None = None) -> HTiesOutput:
    """Plaintext H-TIES exactly as DESIGN §1 stage ii (formulas in the module docstring).

    Guarantees: identical updates -> that update (r0 = 1); two opposite equal updates -> 0;
    ``weights`` sum to 1; every ``retention`` in [0, 1]; ``conflict`` in [0, 1].
    """
    prm = params or HTiesParams()
    ups = check_updates(updates)
    k, p = len(ups), ups[0].size
    s = pairwise_cosine(ups)
    h = heterogeneity(s)
    h_hat = minmax(h)
    w = similarity_weights(s) if k > 1 else np.ones(1)
    r = retention(h_hat, prm.r0, prm.delta)
    u = np.stack([wi * trim_top(d, keep_count(ri, p)) for wi, ri, d in zip(w, r, ups)])
    pos, neg = np.maximum(u, 0.0), np.minimum(u, 0.0)
    wpos = (w[:, None] * (u > 0)).sum(axis=0)
    wneg = (w[:, None] * (u < 0)).sum(axis=0)
    delta = gated_merge(pos.sum(axis=0), neg.sum(axis=0), wpos, wneg, prm.rho, prm.eps)
    sign_sum = np.sign(np.stack(ups)).sum(axis=0)
    return HTiesOutput(delta, conflict_from_sign_sum(sign_sum, k), s, h, h_hat, w, r)


@dataclass
class HTiesAggregator:
    """Plaintext H-TIES behind the :class:`Aggregator` interface (needs every update in the clear)."""

    params: HTiesParams = field(default_factory=HTiesParams)
    name: str = "hties"
    needs_individual_updates: bool = True

    def aggregate(self, updates: Sequence[np.ndarray], num_examples: Sequence[int], state: AggState) -> AggResult:
        """H-TIES step and conflict vector; ``num_examples`` only validated (weights come from S)."""
        ups = check_updates(updates)
        check_num_examples(num_examples, len(ups), need_positive_total=False)
        out = hties(ups, self.params)
        zero = [i for i, u in enumerate(ups) if not np.any(u)]
        return AggResult(delta=out.delta, conflict=out.conflict, info={
            "aggregator": self.name, "num_clients": len(ups),
            "weights": jsonable_floats(out.weights), "h": jsonable_floats(out.h),
            "h_hat": jsonable_floats(out.h_hat), "retention": jsonable_floats(out.retention),
            "mean_conflict": float(out.conflict.mean()), "gated_zero_fraction": float(np.mean(out.delta == 0)),
            "zero_update_clients": zero, "delta_norm": float(np.linalg.norm(out.delta)),
        })
