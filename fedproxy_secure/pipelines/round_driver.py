"""What a federated round decides on the server, once, for every engine that runs rounds from a RunConfig.

``simulate`` (:func:`fedproxy_secure.pipelines.simulate.federate`) and the Flower ServerApp
(:mod:`fedproxy_secure.flower.server_app`) both take from here: the FFA-LoRA A seed, the client's
instructions for round ``r`` (with the client lr schedule), the aggregator the config names, and the
global step with the server optimizer. The network round engine (``server/rounds.py``) is configured
by ``federation.yaml`` instead of a RunConfig; it applies the same two rules,
:func:`fedproxy_secure.aggregate.server_opt.global_step` and
:func:`~fedproxy_secure.aggregate.server_opt.scheduled_lr`, so all three engines move θ identically
(tests/test_server_optimizer.py checks it).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from fedproxy_secure.aggregate import make_aggregator
from fedproxy_secure.aggregate.server_opt import global_step
from fedproxy_secure.config import RunConfig
from fedproxy_secure.errors import ConfigError

#: aggregation rules that need only secure sums (the server never sees one client's update)
SECURE_SUM_AGGREGATORS = ("fedavg", "fedprox", "sa_hties")


def federation_a_seed(seed: int) -> int:
    """The FFA-LoRA A seed of a run with ``seed``: fixed for the run, the same in every engine."""
    return int.from_bytes(hashlib.sha256(f"{seed}/lora-A".encode()).digest()[:8], "big") % (2**63)


def client_round_fields(cfg: RunConfig, round_index: int) -> dict[str, Any]:
    """The scalars of round ``round_index``'s client instructions (``ClientRoundSpec`` fields besides the
    round id, A seed, global state and DP): the scheduled client lr and the aggregator-specific terms."""
    a = cfg.aggregator
    return {
        "pcr_lambda": a.pcr_lambda if a.name in ("hties", "sa_hties") else 0.0,
        "lr": cfg.train.lr_for_round(round_index, cfg.rounds), "local_steps": cfg.train.local_steps,
        "batch_size": cfg.train.batch_size, "max_length": cfg.data.max_length,
        "clip_norm": cfg.train.update_clip_norm, "planned_rounds": cfg.rounds,
        "fedprox_mu": a.fedprox_mu if a.name == "fedprox" else 0.0,
    }


def run_aggregator(cfg: RunConfig, secure_sum):
    """The aggregator ``cfg.aggregator`` names, summing through ``secure_sum``.

    Raises ConfigError (naming the fields and the fix) for a plaintext rule (ties, hties) when
    ``cfg.secagg.mode`` is a secure mode: those rules need every client's update in the clear.
    """
    a = cfg.aggregator
    hparams = dict(r0=a.r0, delta=a.delta, rho=a.rho)
    if a.name == "fedavg":
        return make_aggregator("fedavg", secure_sum=secure_sum)
    if a.name == "fedprox":
        return make_aggregator("fedprox", mu=a.fedprox_mu, secure_sum=secure_sum)
    if a.name == "sa_hties":
        return make_aggregator("sa_hties", secure_sum=secure_sum, **hparams)
    if cfg.secagg.mode != "none":
        raise ConfigError(
            f"aggregator.name = {a.name!r} needs every client's update in the clear, but secagg.mode = "
            f"{cfg.secagg.mode!r} (fix: use sa_hties or fedavg with secure aggregation, or secagg.mode: none)"
        )
    if a.name == "ties":
        return make_aggregator("ties", density=a.ties_density)
    return make_aggregator("hties", **hparams)


class GlobalStepper:
    """The server optimizer's state across a run; :meth:`step` is :func:`global_step` with that state."""

    def __init__(self, cfg: RunConfig) -> None:
        self.opt, self.total_rounds = cfg.aggregator.server_optimizer, cfg.rounds
        self.state: dict[str, np.ndarray] | None = None

    def step(self, theta: np.ndarray, delta: np.ndarray, round_index: int) -> tuple[np.ndarray, dict]:
        """``(θ', info)`` after applying the aggregate ``delta`` (in parameter units) of round ``round_index``."""
        theta, self.state, info = global_step(theta, delta, self.state, self.opt, round_index, self.total_rounds)
        return theta, info
