"""PCR, the proximal conflict regulariser of FedProxy (client side).

Client objective: ``L_task(θ) + λ Σ_p C_p (θ_p - θ_g,p)²`` with ``C`` the conflict vector the server
sent in the round config (zeros in round 0), λ = 1e-5 by default (DESIGN §1 stage ii).
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_PCR_LAMBDA = 1e-5


def pcr_penalty(theta: torch.Tensor, theta_g: torch.Tensor, conflict: torch.Tensor | np.ndarray | None,
                lam: float = DEFAULT_PCR_LAMBDA) -> torch.Tensor:
    """Return ``λ Σ_p C_p (θ_p - θ_g,p)²`` for flattened ``θ`` (differentiable in ``θ``).

    ``conflict=None`` means round 0 (all zeros) and gives exactly zero. Shapes must match.
    """
    if lam < 0:
        raise ValueError(f"pcr.lambda = {lam!r} must be >= 0")
    if conflict is None:
        return theta.sum() * 0.0
    c = torch.as_tensor(conflict, dtype=theta.dtype, device=theta.device)
    if c.shape != theta.shape or theta_g.shape != theta.shape:
        raise ValueError(f"pcr: shapes differ (theta {tuple(theta.shape)}, theta_g {tuple(theta_g.shape)}, C {tuple(c.shape)})")
    return lam * (c * (theta - theta_g.detach().to(device=theta.device, dtype=theta.dtype)) ** 2).sum()
