"""FedProx (Li et al. 2020): FedAvg on the server plus a proximal term in each client's loss.

Client objective: ``L_task(θ) + (μ/2) ‖θ - θ_g‖²``. The server rule is FedAvg (``fedavg.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from fedproxy_secure.aggregate.base import AggResult, AggState, SecureSumFn, plain_sum, require
from fedproxy_secure.aggregate.fedavg import FedAvgAggregator


def _pairs(theta, theta_g) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(theta, torch.Tensor):
        return [(theta, theta_g)]
    theta, theta_g = list(theta), list(theta_g)
    if len(theta) != len(theta_g):
        raise ValueError(f"prox term: {len(theta)} parameters but {len(theta_g)} global references")
    return list(zip(theta, theta_g))


def prox_penalty(theta: torch.Tensor | Iterable[torch.Tensor], theta_g: torch.Tensor | Iterable[torch.Tensor], mu: float) -> torch.Tensor:
    """Return ``(μ/2) Σ ‖θ - θ_g‖²`` as a differentiable scalar tensor (gradient ``μ (θ - θ_g)``).

    ``theta``/``theta_g``: one tensor each or matching iterables of tensors (e.g. the trainable
    LoRA parameters and detached copies of the global ones). ``μ = 0`` gives exactly zero.
    """
    if mu < 0:
        raise ValueError(f"fedprox.mu = {mu!r} must be >= 0")
    total = None
    for t, g in _pairs(theta, theta_g):
        term = ((t - g.detach().to(t.dtype)) ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("prox term: no parameters given")
    return 0.5 * mu * total


@dataclass
class FedProxAggregator(FedAvgAggregator):
    """FedProx server side = FedAvg; carries ``mu`` so clients can read it from the round config."""

    mu: float = 0.01
    secure_sum: SecureSumFn = plain_sum
    name: str = "fedprox"
    needs_individual_updates: bool = False

    def __post_init__(self) -> None:
        require(self.mu >= 0, "mu", self.mu, "the FedProx proximal weight must be >= 0 (e.g. 0.01)")

    def aggregate(self, updates: Sequence[np.ndarray], num_examples: Sequence[int], state: AggState) -> AggResult:
        """FedAvg of the updates; ``info['mu']`` records the client-side proximal weight."""
        res = super().aggregate(updates, num_examples, state)
        res.info["mu"] = float(self.mu)
        return res
