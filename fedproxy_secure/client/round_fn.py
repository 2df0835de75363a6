"""Adapter from the network loop's ``train_fn(theta, round_config)`` to :func:`train_round`.

The LoRA model is attached once, at setup, with the federation's A seed; FFA-LoRA needs the *same*
A in every round (θ is B for that fixed A), so a round config whose ``a_seed`` differs from the
attach-time seed is refused (ModelError) unless ``strict_a_seed=False``.
Round config keys read: ``round_id``, ``clip_norm``, ``total_rounds``, optional ``a_seed`` and
``conflict`` (list or array), and ``train`` = {lr, local_steps, batch_size, max_length, pcr_lambda,
fedprox_mu}. DP settings are the client's own (``dp``), never taken from the server.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from fedproxy_secure.config import DPConfig
from fedproxy_secure.errors import ModelError
from fedproxy_secure.privacy.budget import PrivacyBudget


def make_round_train_fn(model, tokenizer, examples: Sequence, *, a_seed: int, dp: DPConfig | None = None,
                        budget: PrivacyBudget | None = None, planned_rounds: int | None = None,
                        defaults: dict | None = None, device: str = "cpu",
                        strict_a_seed: bool = True) -> Callable[[np.ndarray, dict], tuple[np.ndarray, dict]]:
    """A ``train_fn(theta, cfg) -> (clipped delta, report)`` for :mod:`fedproxy_secure.client.join`."""
    from fedproxy_secure.client.trainer import ClientRoundSpec, train_round

    base = {"lr": 2e-4, "local_steps": 10, "batch_size": 8, "max_length": 256, "pcr_lambda": 1e-5, "fedprox_mu": 0.0}
    base.update(defaults or {})

    def train_fn(theta: np.ndarray, cfg: dict) -> tuple[np.ndarray, dict]:
        if strict_a_seed and "a_seed" in cfg and int(cfg["a_seed"]) != int(a_seed):
            raise ModelError(f"round {cfg.get('round_id')}: round config a_seed={cfg['a_seed']} differs from the "
                             f"federation's a_seed={a_seed}; FFA-LoRA needs one fixed A for the whole federation")
        tr = dict(base, **(cfg.get("train") or {}))
        conflict = cfg.get("conflict")
        spec = ClientRoundSpec(
            round_id=int(cfg["round_id"]), a_seed=int(a_seed), theta_global=np.asarray(theta, dtype=np.float64),
            conflict=None if conflict is None else np.asarray(conflict, dtype=np.float64),
            pcr_lambda=float(tr["pcr_lambda"]), lr=float(tr["lr"]), local_steps=int(tr["local_steps"]),
            batch_size=int(tr["batch_size"]), max_length=int(tr["max_length"]), clip_norm=float(cfg["clip_norm"]),
            dp=dp if dp is not None and dp.enabled else None,
            planned_rounds=int(planned_rounds or cfg.get("total_rounds") or 1), fedprox_mu=float(tr["fedprox_mu"]),
        )
        upd = train_round(model, tokenizer, examples, spec, budget=budget, device=device)
        return upd.delta, dict(upd.metrics, num_examples=upd.num_examples)

    return train_fn
