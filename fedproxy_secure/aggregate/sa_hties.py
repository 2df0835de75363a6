"""SA-H-TIES: H-TIES when the server only ever sees sums over clients (DESIGN §1 stage ii).

Two securely-summed phases; each runs unchanged over the plain sum, the masking mode or the HE mode.

Phase A, client i sends ``[Δ̂_i, sgn(Δ_i)]`` (``Δ̂ = Δ/‖Δ‖``, 0 for a zero update). The server gets
``T = Σ_i Δ̂_i`` and ``Σ_i sgn(Δ_i)`` and broadcasts ``T`` (and K) in the phase-B round config.

Client i then computes locally, from ``T`` only:
  * ``s_i = <Δ̂_i, T - Δ̂_i> = Σ_{j≠i} S_ij`` (signed: plaintext H-TIES uses ``Σ|S_ij|`` for w);
  * ``h_i = 1 - max(s_i, 0)/(K-1)`` in [0, 1] (plaintext clips each term: ``Σ max(S_ij,0)``; here the
    sum is clipped; the two agree when no pair has negative cosine); ``h = 0`` when K = 1;
  * ``ĥ_i``: with ``h_norm="reveal"`` each client reveals the scalar ``h_i`` in the clear, the server
    broadcasts ``(min h, max h)`` and ``ĥ_i = (h_i - min)/(max - min)`` (0 if constant): exactly the
    plaintext normalisation, at the cost of one extra scalar message and of leaking h_i (client i's
    mean positive agreement with the others). With ``h_norm="none"``, ``ĥ_i = h_i`` (nothing revealed);
  * ``w_i = exp(s_i - m)`` with the public shift ``m = max(‖T‖ - 1, 0)``. By Cauchy–Schwarz
    ``s_i = <Δ̂_i, T> - 1 ≤ ‖T‖ - 1``, so ``w_i ∈ (0, 1]``; the aggregate's ratios are invariant to
    the softmax normaliser and to the shift. Lower bound ``w_i ≥ exp(-2(K-1))``;
  * ``r_i = clip(r0 - δ ĥ_i, 0, 1)``, ``Δ̃_i`` = top ``⌊r_i P⌋`` coordinates, ``u_i = w_i Δ̃_i``.

Phase B, client i sends ``[max(u_i,0), min(u_i,0), w_i·1[u_i>0], w_i·1[u_i<0]]``; the server gets the
four sums and computes Δ* with the ρ gate and ``C = 1 - |Σ sgn Δ_i|/K`` exactly as plaintext H-TIES
would from the same w, r.

Value bounds (for the secure summer's clip range): every coordinate of every phase vector lies in
``[-1, 1]`` whenever ``‖Δ_i‖_∞ ≤ 1`` (in particular when updates are clipped to L2 norm ≤ 1):
``|Δ̂| ≤ 1``, ``sgn ∈ {-1,0,1}``, ``|u| ≤ w_i|Δ| ≤ 1``, ``w·1[·] ∈ [0, 1]``. Every sum lies in ``[-K, K]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from fedproxy_secure.aggregate.base import AggResult, AggState, SecureSumFn, jsonable_floats, plain_sum
from fedproxy_secure.aggregate.hties import (
    HTiesParams,
    conflict_from_sign_sum,
    gated_merge,
    retention,
)
from fedproxy_secure.aggregate.ties import keep_count, trim_top
from fedproxy_secure.aggregate.validate import check_num_examples, check_updates
from fedproxy_secure.errors import ConfigError, DataError

PHASE_A_PARTS = 2  # normalised update, sign vector
PHASE_B_PARTS = 4  # positive part, negative part, weights on positive side, weights on negative side


def _vec(x) -> np.ndarray:
    return check_updates([x])[0]


def _normalised(delta: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(delta))
    return np.clip(delta / n, -1.0, 1.0) if n > 0 else np.zeros_like(delta)


# ----------------------------------------------------------------------------------- client side

def sa_phase_a_client(delta: np.ndarray) -> list[np.ndarray]:
    """Phase-A vectors of one client: ``[Δ/‖Δ‖, sgn(Δ)]`` (zero update -> ``[0, 0]``).

    Bounds: every coordinate in ``[-1, 1]``; the first vector has L2 norm 1 (or 0).
    """
    d = _vec(delta)
    return [_normalised(d), np.sign(d)]


def sa_client_similarity(delta: np.ndarray, sum_normalised: np.ndarray) -> float:
    """``s_i = <Δ̂_i, T - Δ̂_i>`` = Σ_{j≠i} cos(Δ_i, Δ_j) (exact when T is the exact sum)."""
    d = _vec(delta)
    t = _vec(sum_normalised)
    if t.size != d.size:
        raise DataError(f"phase-A sum has length {t.size}, the update has length {d.size}")
    x = _normalised(d)
    return float(x @ t - x @ x)


def sa_client_h(delta: np.ndarray, sum_normalised: np.ndarray, num_clients: int) -> float:
    """The client's heterogeneity ``h_i = 1 - max(s_i, 0)/(K-1)`` in [0, 1] (0 when K = 1).

    With ``h_norm="reveal"`` this scalar is sent to the server in the clear.
    """
    if num_clients < 1:
        raise ConfigError(f"sa_hties.num_clients = {num_clients!r}; must be >= 1")
    if num_clients == 1:
        return 0.0
    s = sa_client_similarity(delta, sum_normalised)
    return float(min(1.0, max(0.0, 1.0 - max(s, 0.0) / (num_clients - 1))))


def sa_weight_shift(sum_normalised: np.ndarray) -> float:
    """Public shift ``m = max(‖T‖ - 1, 0)``: guarantees ``exp(s_i - m) ≤ 1`` for every client."""
    return max(float(np.linalg.norm(sum_normalised)) - 1.0, 0.0)


def _h_hat(h: float, h_norm: str, h_range: tuple[float, float] | None) -> float:
    if h_norm == "none":
        return h
    if h_range is None:
        raise ConfigError("sa_hties: h_norm='reveal' needs h_range=(min h, max h) from the server in the "
                          "phase-B round config; collect every client's sa_client_h first")
    lo, hi = float(h_range[0]), float(h_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise DataError(f"sa_hties: h_range = {h_range!r} is not a valid (min, max) pair")
    if hi - lo <= 1e-12:
        return 0.0
    return min(1.0, max(0.0, (h - lo) / (hi - lo)))


@dataclass
class SAPhaseB:
    """One client's phase-B message: ``vectors`` to be securely summed, plus local scalars.

    ``vectors = [max(u,0), min(u,0), w·1[u>0], w·1[u<0]]``. ``h`` is the scalar revealed in
    ``h_norm="reveal"`` mode (sent earlier, via ``sa_client_h``); ``weight`` and ``retention`` are
    private to the client (reported here for simulation and tests only).
    """

    vectors: list[np.ndarray]
    h: float
    weight: float
    retention: float


def sa_phase_b_client(
    delta: np.ndarray,
    sum_normalised: np.ndarray,
    sum_signs: np.ndarray | None = None,
    params: HTiesParams | None = None,
    *,
    num_clients: int,
    h_range: tuple[float, float] | None = None,
) -> SAPhaseB:
    """Phase-B vectors of one client from the broadcast phase-A sum (formulas: module docstring).

    ``sum_signs`` is accepted for interface symmetry and not used (C is computed by the server).
    ``h_range`` is required when ``params.h_norm == "reveal"``. Bounds: every coordinate in
    ``[-max|Δ_p|, max|Δ_p|]`` for the first two vectors, ``[0, 1]`` for the last two.
    """
    prm = params or HTiesParams()
    d = _vec(delta)
    t = _vec(sum_normalised)
    if t.size != d.size:
        raise DataError(f"phase-A sum has length {t.size}, the update has length {d.size}")
    if num_clients < 1:
        raise ConfigError(f"sa_hties.num_clients = {num_clients!r}; must be >= 1")
    s = sa_client_similarity(d, t)
    h = sa_client_h(d, t, num_clients)
    w = math.exp(min(0.0, s - sa_weight_shift(t)))  # min(): guards float rounding above 1
    r = float(retention(np.array([_h_hat(h, prm.h_norm, h_range)]), prm.r0, prm.delta)[0])
    u = w * trim_top(d, keep_count(r, d.size))
    vectors = [np.maximum(u, 0.0), np.minimum(u, 0.0), w * (u > 0), w * (u < 0)]
    return SAPhaseB(vectors=vectors, h=h, weight=w, retention=r)


# ----------------------------------------------------------------------------------- server side

def sa_h_range(hs: Sequence[float], num_clients: int) -> tuple[float, float]:
    """Server, ``h_norm="reveal"``: check the K revealed scalars and return ``(min h, max h)``."""
    if len(hs) != num_clients:
        raise DataError(f"sa_hties: {len(hs)} clients revealed h but the cohort has {num_clients}")
    arr = np.asarray(hs, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0) | (arr > 1))
    if bad.size:
        raise DataError(f"sa_hties: client {int(bad[0])} revealed h = {hs[bad[0]]!r}; h must be in [0, 1]")
    return float(arr.min()), float(arr.max())


def pack(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate a client's phase vectors into one vector (one secure sum per phase)."""
    return np.concatenate([np.asarray(v, dtype=np.float64) for v in vectors])


def unpack(total: np.ndarray, parts: int) -> list[np.ndarray]:
    """Split a summed packed vector back into ``parts`` equal pieces; ``DataError`` if it does not divide."""
    total = np.asarray(total, dtype=np.float64)
    if total.ndim != 1 or total.size % parts or total.size == 0:
        raise DataError(f"secure sum has shape {total.shape}; expected a 1-D vector of {parts} x P")
    return list(total.reshape(parts, -1))


def sa_server_finish(
    sums_phase_a: Sequence[np.ndarray],
    sums_phase_b: Sequence[np.ndarray],
    num_clients: int,
    params: HTiesParams | None = None,
) -> AggResult:
    """Server: Δ* and C from the secure sums only.

    ``sums_phase_a = [Σ Δ̂_i, Σ sgn Δ_i]``, ``sums_phase_b = [Σ max(u,0), Σ min(u,0), Σ w·1[u>0], Σ w·1[u<0]]``.
    ``Δ*`` = ρ-gated merge (``hties.gated_merge``); ``C = clip(1 - |Σ sgn|/K, 0, 1)``. ``info`` holds
    only server-visible quantities.
    """
    prm = params or HTiesParams()
    if len(sums_phase_a) != PHASE_A_PARTS or len(sums_phase_b) != PHASE_B_PARTS:
        raise DataError(f"sa_server_finish: expected {PHASE_A_PARTS} phase-A and {PHASE_B_PARTS} phase-B sums, "
                        f"got {len(sums_phase_a)} and {len(sums_phase_b)}")
    if num_clients < 1:
        raise ConfigError(f"sa_hties.num_clients = {num_clients!r}; must be >= 1")
    a = check_updates(list(sums_phase_a))
    b = check_updates(list(sums_phase_b))
    if a[0].size != b[0].size:
        raise DataError(f"phase-A sums have length {a[0].size}, phase-B sums {b[0].size}")
    delta = gated_merge(b[0], b[1], b[2], b[3], prm.rho, prm.eps)
    conflict = conflict_from_sign_sum(a[1], num_clients)
    return AggResult(delta=delta, conflict=conflict, info={
        "aggregator": "sa_hties", "num_clients": int(num_clients), "h_norm": prm.h_norm,
        "sum_normalised_norm": float(np.linalg.norm(a[0])),
        "mean_conflict": float(conflict.mean()), "gated_zero_fraction": float(np.mean(delta == 0)),
        "delta_norm": float(np.linalg.norm(delta)),
    })


@dataclass
class SAHTiesAggregator:
    """SA-H-TIES behind the :class:`Aggregator` interface, simulating both phases in one call.

    ``secure_sum`` is called once per phase on the clients' packed vectors (2P then 4P values).
    In ``h_norm="reveal"`` mode the K scalars h_i are exchanged in the clear between the phases.
    """

    params: HTiesParams = field(default_factory=HTiesParams)
    secure_sum: SecureSumFn = plain_sum
    name: str = "sa_hties"
    needs_individual_updates: bool = False

    def aggregate(self, updates: Sequence[np.ndarray], num_examples: Sequence[int], state: AggState) -> AggResult:
        """Run phase A, (reveal), phase B and the server finish over ``secure_sum``."""
        ups = check_updates(updates)
        k = len(ups)
        check_num_examples(num_examples, k, need_positive_total=False)
        sums_a = unpack(self.secure_sum([pack(sa_phase_a_client(d)) for d in ups]), PHASE_A_PARTS)
        h_range = None
        if self.params.h_norm == "reveal":
            h_range = sa_h_range([sa_client_h(d, sums_a[0], k) for d in ups], k)
        msgs = [sa_phase_b_client(d, sums_a[0], sums_a[1], self.params, num_clients=k, h_range=h_range)
                for d in ups]
        sums_b = unpack(self.secure_sum([pack(m.vectors) for m in msgs]), PHASE_B_PARTS)
        res = sa_server_finish(sums_a, sums_b, k, self.params)
        w = np.array([m.weight for m in msgs])
        if h_range is not None:
            res.info["h_range"] = [h_range[0], h_range[1]]
        res.info["zero_update_clients"] = [i for i, u in enumerate(ups) if not np.any(u)]
        res.info["client_side_simulated"] = {  # never visible to a real server
            "weights": jsonable_floats(w / w.sum()), "h": jsonable_floats([m.h for m in msgs]),
            "retention": jsonable_floats([m.retention for m in msgs]),
        }
        return res
