"""The server's global step: how the aggregated update moves the global LoRA vector.

One pure function, :func:`global_step`, is the global step of every engine (``simulate``, the
network round engine and the Flower ServerApp call it), so a recipe tuned in one runs unchanged in
the others. It needs only the aggregate ``Δ`` (the secure sum's output), never an individual update,
so it composes with masking, CKKS and SA-H-TIES alike.

Optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021; Hsu et al. 2019 for FedAvgM),
with ``Δ_t`` the aggregate of round ``t`` used as a pseudo-gradient and ``η_t`` the server lr:

* ``sgd``   (FedAvg with a server lr): ``θ ← θ + η_t Δ_t``
* ``avgm``  (FedAvgM): ``m ← β₁ m + Δ_t``; ``θ ← θ + η_t m``
* ``adam``  (FedAdam): ``m ← β₁ m + (1−β₁) Δ_t``; ``v ← β₂ v + (1−β₂) Δ_t²``; ``θ ← θ + η_t m / (√v + τ)``
* ``yogi``  (FedYogi): as ``adam`` with ``v ← v − (1−β₂) Δ_t² sign(v − Δ_t²)``

``η_t`` follows ``schedule`` over the planned rounds (``constant`` or ``cosine`` down to
``min_lr_ratio · lr``). The state (``m``, ``v``, step count) is a plain dict of float64 arrays so the
network engine can store it beside the global state and survive a restart.
"""

from __future__ import annotations

import math
from typing import Literal, Mapping

import numpy as np
from pydantic import Field

from fedproxy_secure.errors import ConfigError
from fedproxy_secure.strict import StrictModel

OPTIMIZERS = ("sgd", "avgm", "adam", "yogi")


class ServerOptimizerConfig(StrictModel):
    """How the server applies the aggregate (validated at every boundary that carries it)."""

    name: Literal["sgd", "avgm", "adam", "yogi"] = "sgd"
    lr: float = Field(1.0, gt=0, description="server learning rate η (sgd/avgm: 1.0 = plain FedAvg)")
    beta1: float = Field(0.9, ge=0, lt=1, description="momentum (avgm) / first-moment decay (adam, yogi)")
    beta2: float = Field(0.99, ge=0, lt=1, description="second-moment decay (adam, yogi)")
    tau: float = Field(1e-3, gt=0, description="adaptivity floor τ (adam, yogi)")
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine schedule: final lr as a fraction of lr")


#: the default of run configs and federation.yaml: FedAvgM (server lr 1, momentum 0.7), chosen on validation curves
#: under label skew (docs/decisions/federation-recipe.md); ``ServerOptimizerConfig()`` itself is plain θ + Δ
RECIPE_SERVER_OPTIMIZER = ServerOptimizerConfig(name="avgm", lr=1.0, beta1=0.7)


def scheduled_lr(lr: float, schedule: str, round_index: int, total_rounds: int, min_lr_ratio: float = 0.0) -> float:
    """The learning rate of 0-based round ``round_index`` of ``total_rounds``.

    ``constant``: ``lr`` every round. ``cosine``: ``lr`` at round 0, decaying on a half cosine to
    ``min_lr_ratio · lr`` at the last round. Guarantees a value in ``[min_lr_ratio · lr, lr]``.
    """
    if schedule == "constant" or total_rounds <= 1:
        return float(lr)
    if schedule != "cosine":
        raise ConfigError(f"schedule: {schedule!r} is unknown; use constant or cosine")
    frac = min(max(round_index, 0), total_rounds - 1) / (total_rounds - 1)
    floor = min_lr_ratio * lr
    return float(floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def initial_state(dim: int) -> dict[str, np.ndarray]:
    """The optimizer state before round 1: zero moments, step 0."""
    return {"m": np.zeros(dim), "v": np.zeros(dim), "step": np.zeros(1)}


def global_step(theta: np.ndarray, delta: np.ndarray, state: Mapping[str, np.ndarray] | None,
                cfg: ServerOptimizerConfig, round_index: int, total_rounds: int
                ) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """``(θ', state', info)``: apply the aggregate ``delta`` of 0-based round ``round_index``.

    Pure: ``theta``, ``delta`` and ``state`` are not modified. ``state`` None means
    :func:`initial_state`. Guarantees: ``θ'`` is finite and has ``theta``'s shape (``ValueError``
    otherwise, before anything is returned), and with ``sgd`` at ``lr`` 1 and a constant schedule
    ``θ' = θ + Δ`` exactly. ``info`` holds the lr used and the step's norm, for round records.
    """
    theta = np.asarray(theta, dtype=np.float64)
    delta = np.asarray(delta, dtype=np.float64)
    if delta.shape != theta.shape:
        raise ValueError(f"aggregate has shape {delta.shape}, the global vector {theta.shape}")
    if not np.isfinite(delta).all():
        raise ValueError("aggregate has NaN/Inf values: refusing the global step")
    st = initial_state(theta.size) if state is None else {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
    if st["m"].shape != theta.shape or st["v"].shape != theta.shape:
        raise ValueError(f"server optimizer state has shape {st['m'].shape}, the global vector {theta.shape}")
    lr = scheduled_lr(cfg.lr, cfg.schedule, round_index, total_rounds, cfg.min_lr_ratio)
    m, v = st["m"], st["v"]
    if cfg.name == "sgd":
        step = lr * delta
    elif cfg.name == "avgm":
        m = cfg.beta1 * m + delta
        step = lr * m
    else:
        m = cfg.beta1 * m + (1.0 - cfg.beta1) * delta
        sq = delta * delta
        v = cfg.beta2 * v + (1.0 - cfg.beta2) * sq if cfg.name == "adam" else v - (1.0 - cfg.beta2) * sq * np.sign(v - sq)
        step = lr * m / (np.sqrt(np.maximum(v, 0.0)) + cfg.tau)
    new_theta = theta + step
    if not np.isfinite(new_theta).all():
        raise ValueError("server optimizer produced NaN/Inf: refusing the global step (lower the server lr)")
    new_state = {"m": m, "v": v, "step": st["step"] + 1.0}
    return new_theta, new_state, {"server_lr": lr, "step_norm": float(np.linalg.norm(step)), "optimizer": cfg.name}


def state_arrays(state: Mapping[str, np.ndarray], prefix: str = "opt.") -> dict[str, np.ndarray]:
    """The state as named float64 arrays (for safetensors), keys prefixed with ``prefix``."""
    return {prefix + k: np.ascontiguousarray(v, dtype=np.float64) for k, v in state.items()}


def state_from_arrays(arrays: Mapping[str, np.ndarray], prefix: str = "opt.") -> dict[str, np.ndarray] | None:
    """Inverse of :func:`state_arrays`; None when ``arrays`` holds no optimizer state."""
    st = {k[len(prefix):]: np.asarray(v, dtype=np.float64) for k, v in arrays.items() if k.startswith(prefix)}
    if not st:
        return None
    missing = {"m", "v", "step"} - set(st)
    if missing:
        raise ValueError(f"server optimizer state lacks {sorted(missing)}")
    return st
