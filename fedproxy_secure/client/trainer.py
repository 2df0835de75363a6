"""One client's local round: LoRA on the proxy from the global state, PCR, optional DP-SGD, clipped delta.

``train_round`` is what runs inside an institution. Guarantees:
- it starts from ``spec.theta_global`` (the LoRA vector is overwritten first);
- under DP the round is charged to the on-disk budget *before* any example is touched, and refused
  with PrivacyBudgetExceeded if it would exceed the total ε;
- the returned delta is finite and has L2 norm ≤ ``spec.clip_norm``; on a NaN/inf loss or delta the
  round raises TrainingAborted and nothing is returned (nothing can be sent);
- DP noise and Poisson sampling use fresh OS entropy, never a seed from the round config.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from fedproxy_secure.aggregate.pcr import pcr_penalty
from fedproxy_secure.client.batches import (
    Encoded, answer_loss, collate, context_limit, encode_examples, make_batches,
)
from fedproxy_secure.config import DPConfig
from fedproxy_secure.errors import ConfigError, FedProxyError, ModelError
from fedproxy_secure.lora import get_lora_vector, set_lora_vector, trainable_lora_params
from fedproxy_secure.privacy.accountant import ACCOUNTANT_NAME, epsilon_spent, noise_multiplier_for
from fedproxy_secure.privacy.budget import PrivacyBudget
from fedproxy_secure.privacy.clip import clip_l2

Progress = Callable[[int, int, float], None]

__all__ = ["ClientRoundSpec", "ClientUpdate", "TrainingAborted", "make_batches", "train_centralized", "train_round"]


class TrainingAborted(FedProxyError):
    """Local training failed (NaN/inf loss or update); the round is abandoned and nothing is sent."""


@dataclass
class ClientRoundSpec:
    """What the round config tells a client to do (plus its local DP settings)."""

    round_id: int
    a_seed: int
    theta_global: np.ndarray
    conflict: Optional[np.ndarray]
    pcr_lambda: float
    lr: float
    local_steps: int
    batch_size: int
    max_length: int
    clip_norm: float
    dp: Optional[DPConfig]
    planned_rounds: int
    fedprox_mu: float = 0.0
    shuffle_seed: Optional[int] = None  # non-DP batch order only (simulate's seeded runs, tests); None = OS entropy


@dataclass
class ClientUpdate:
    """The clipped update of the trainable LoRA vector and what the client reports about it."""

    delta: np.ndarray
    num_examples: int
    metrics: dict = field(default_factory=dict)


def _check_spec(spec: ClientRoundSpec, dim: int) -> None:
    theta = np.asarray(spec.theta_global)
    if theta.shape != (dim,):
        raise ModelError(f"round {spec.round_id}: theta_global has shape {theta.shape}, this proxy's trainable LoRA "
                         f"vector has {dim} values (LoRA config or a_seed layout differs)")
    if spec.conflict is not None and np.asarray(spec.conflict).shape != (dim,):
        raise ModelError(f"round {spec.round_id}: conflict vector has shape {np.asarray(spec.conflict).shape}, expected ({dim},)")
    for name in ("lr", "clip_norm"):
        if not getattr(spec, name) > 0:
            raise ConfigError(f"train.{name} = {getattr(spec, name)!r}: must be > 0")
    for name in ("local_steps", "batch_size", "planned_rounds"):
        if int(getattr(spec, name)) < 1:
            raise ConfigError(f"train.{name} = {getattr(spec, name)!r}: must be >= 1")
    if spec.pcr_lambda < 0 or spec.fedprox_mu < 0:
        raise ConfigError("aggregator.pcr_lambda and aggregator.fedprox_mu must be >= 0")


def _regulariser_grads(params: list[nn.Parameter], theta_g: torch.Tensor, spec: ClientRoundSpec) -> list[torch.Tensor] | None:
    """Gradients of ``λ Σ C_p (θ_p − θ_g,p)² + (μ/2)‖θ − θ_g‖²`` w.r.t. each parameter (None if both are off).

    The regulariser does not depend on data, so it is added after DP noise at no privacy cost.
    """
    use_pcr = spec.conflict is not None and spec.pcr_lambda > 0
    if not use_pcr and spec.fedprox_mu == 0:
        return None
    with torch.enable_grad():
        theta = torch.cat([p.reshape(-1) for p in params])
        reg = theta.sum() * 0.0
        if use_pcr:
            reg = reg + pcr_penalty(theta, theta_g.to(device=theta.device, dtype=theta.dtype), spec.conflict, spec.pcr_lambda)
        if spec.fedprox_mu:
            reg = reg + 0.5 * spec.fedprox_mu * ((theta - theta_g.to(device=theta.device, dtype=theta.dtype)) ** 2).sum()
        return list(torch.autograd.grad(reg, params))


def regulariser_gradient(model: nn.Module, spec: ClientRoundSpec) -> np.ndarray:
    """The regulariser's gradient as a flat float64 vector in LoRA-vector layout (zeros if off)."""
    params = trainable_lora_params(model)
    grads = _regulariser_grads(params, torch.from_numpy(np.asarray(spec.theta_global, dtype=np.float64)), spec)
    if grads is None:
        return np.zeros(sum(p.numel() for p in params))
    return torch.cat([g.reshape(-1).double() for g in grads]).numpy()


def _entropy_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from the OS CSPRNG (DP noise must be drawn where the gradients live)."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def _pad_id(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return int(pid or 0)


def _finite_or_abort(loss: torch.Tensor, spec: ClientRoundSpec, step: int) -> None:
    if not torch.isfinite(loss).all():
        raise TrainingAborted(
            f"round {spec.round_id}: loss is {float(loss.detach().float().mean())} at local step {step + 1}; round "
            "aborted for this client and nothing is sent (lower train.lr or check the data)"
        )


def _batch_iter(items: list[Encoded], spec: ClientRoundSpec, pad_id: int):
    gen = torch.Generator().manual_seed(spec.shuffle_seed) if spec.shuffle_seed is not None else _entropy_generator()
    while True:
        for b in make_batches(items, spec.batch_size, pad_id, generator=gen):
            yield b


def train_round(model, tokenizer, examples: Sequence, spec: ClientRoundSpec, *, budget: PrivacyBudget | None = None,
                device: str = "cpu", progress: Progress | None = None) -> ClientUpdate:
    """Train one round locally and return the clipped delta of the trainable LoRA vector.

    See the module docstring for the guarantees. Raises DataError (empty data), PrivacyBudgetExceeded
    (before training), TrainingAborted (NaN/inf; nothing to send), ModelError (layout mismatch).
    """
    params = trainable_lora_params(model)
    dim = sum(p.numel() for p in params)
    if dim == 0:
        raise ModelError("train_round: the model has no trainable LoRA parameters; call attach_lora first")
    _check_spec(spec, dim)
    max_len = context_limit(model, spec.max_length)
    enc = encode_examples(tokenizer, examples, max_len)
    items, n = enc.items, len(enc.items)
    dp = spec.dp if spec.dp is not None and spec.dp.enabled else None
    metrics: dict = {"truncated": enc.truncated, "dropped_no_answer": enc.dropped_no_answer, "round_id": spec.round_id}

    sigma = q = None
    if dp is not None:
        q = spec.batch_size / n
        if q > 1:
            raise ConfigError(f"train.batch_size = {spec.batch_size} exceeds the {n} usable examples; DP-SGD needs "
                              "batch_size <= number of examples (sample rate <= 1)")
        sigma = noise_multiplier_for(dp.epsilon, dp.delta, q, spec.planned_rounds * spec.local_steps)
        if budget is not None:
            if abs(budget.delta - dp.delta) > 0:
                raise ConfigError(f"dp.delta = {dp.delta} differs from the budget file's delta {budget.delta}")
            budget.check_can_spend(sigma, q, spec.local_steps, round_id=spec.round_id)
            # charged before any example is touched: a crash mid-round still counts
            eps = budget.record(spec.round_id, sigma, q, spec.local_steps)
            metrics["epsilon_scope"] = "total spent by this client so far"
        else:
            eps = epsilon_spent([(sigma, q, spec.local_steps)], dp.delta)
            metrics["epsilon_scope"] = "this round only (no budget file)"
        metrics.update(epsilon=eps, delta=dp.delta, accountant=ACCOUNTANT_NAME, noise_multiplier=sigma,
                       sample_rate=q, max_grad_norm=dp.max_grad_norm)

    theta_g = np.asarray(spec.theta_global, dtype=np.float64)
    set_lora_vector(model, theta_g)
    theta_g_t = torch.from_numpy(theta_g)
    model.to(device)
    t0 = time.perf_counter()
    losses: list[float] = []
    was_training = model.training
    try:
        if dp is None:
            _loop_plain(model, items, spec, params, theta_g_t, tokenizer, device, losses, progress)
        else:
            _loop_dp(model, items, spec, params, theta_g_t, tokenizer, device, losses, progress, sigma, q, dp)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0

    delta = get_lora_vector(model) - theta_g
    if not np.isfinite(delta).all():
        set_lora_vector(model, theta_g)
        raise TrainingAborted(f"round {spec.round_id}: the update has NaN/inf values; round aborted, nothing is sent")
    clipped, pre = clip_l2(delta, spec.clip_norm)
    metrics.update(
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        final_loss=losses[-1] if losses else float("nan"),
        pre_clip_norm=pre, post_clip_norm=float(np.linalg.norm(clipped)), steps=spec.local_steps,
        seconds=seconds, seconds_per_step=seconds / spec.local_steps, num_params=dim, dp=dp is not None,
    )
    return ClientUpdate(delta=clipped, num_examples=n, metrics=metrics)


def _apply_step(optimizer, params, theta_g_t, spec) -> None:
    reg = _regulariser_grads(params, theta_g_t, spec)
    if reg is not None:
        with torch.no_grad():
            for p, g in zip(params, reg):
                g = g.to(device=p.device, dtype=p.dtype)
                p.grad = g if p.grad is None else p.grad + g
    optimizer.step()


def _loop_plain(model, items, spec, params, theta_g_t, tokenizer, device, losses, progress) -> None:
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    model.train()
    batches = _batch_iter(items, spec, _pad_id(tokenizer))
    for step in range(spec.local_steps):
        b = {k: v.to(device) for k, v in next(batches).items()}
        opt.zero_grad(set_to_none=True)
        loss = answer_loss(model, b).mean()
        _finite_or_abort(loss, spec, step)
        loss.backward()
        _apply_step(opt, params, theta_g_t, spec)
        losses.append(float(loss.detach()))
        if progress:
            progress(step + 1, spec.local_steps, float(loss.detach()))


def _loop_dp(model, items, spec, params, theta_g_t, tokenizer, device, losses, progress, sigma, q, dp) -> None:
    from fedproxy_secure.privacy.dp_sgd import (
        dropout_off, make_dp_optimizer, make_grad_sample_module, poisson_batch, set_empty_grad_samples,
    )

    pad = _pad_id(tokenizer)
    sampler = _entropy_generator()
    noise_gen = _entropy_generator(device)
    gsm = make_grad_sample_module(model)
    try:
        opt = make_dp_optimizer(torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0), noise_multiplier=sigma,
                                max_grad_norm=dp.max_grad_norm, expected_batch_size=spec.batch_size, generator=noise_gen)
        gsm.train()
        with dropout_off(model):
            for step in range(spec.local_steps):
                idx = poisson_batch(len(items), q, sampler)
                opt.zero_grad(set_to_none=True)
                if idx:
                    b = {k: v.to(device) for k, v in collate([items[i] for i in idx], pad).items()}
                    loss = answer_loss(gsm, b).mean()
                    _finite_or_abort(loss, spec, step)
                    loss.backward()
                    losses.append(float(loss.detach()))
                else:
                    set_empty_grad_samples(params)  # empty Poisson batch: a pure-noise step
                if opt.pre_step():
                    reg = _regulariser_grads(params, theta_g_t, spec)
                    if reg is not None:
                        with torch.no_grad():
                            for p, g in zip(params, reg):
                                p.grad += g.to(device=p.device, dtype=p.dtype)
                    opt.original_optimizer.step()
                if progress:
                    progress(step + 1, spec.local_steps, losses[-1] if losses else float("nan"))
    finally:
        gsm._close()


def train_centralized(model, tokenizer, examples: Sequence, *, epochs: int = 1, lr: float = 2e-4, batch_size: int = 8,
                      max_length: int = 256, device: str = "cpu", progress: Progress | None = None,
                      lora_cfg=None, seed: int = 0) -> dict:
    """Plain LoRA training (full A+B, standard peft init, loss on answer tokens) for baselines.

    ``model`` is a peft model (its trainable parameters are trained) or a base causal LM (LoRA with
    ``lora_cfg`` — default r=8, α=16, all default targets, A and B trained — is attached with peft's
    own initialisation). Returns ``{"model", "train_loss", "steps", "seconds", "truncated"}``.
    """
    import peft

    from fedproxy_secure.config import LoraConfig
    from fedproxy_secure.lora import default_target_modules

    if not isinstance(model, peft.PeftModel):
        cfg = lora_cfg or LoraConfig(ffa=False)
        torch.manual_seed(seed)
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none", task_type="CAUSAL_LM",
            target_modules=list(cfg.target_modules or default_target_modules(model)),
            fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules())))
    params = [p for p in model.parameters() if p.requires_grad]
    enc = encode_examples(tokenizer, examples, context_limit(model, max_length))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    total = epochs * math.ceil(len(enc.items) / batch_size)
    losses, step, t0 = [], 0, time.perf_counter()
    for _ in range(epochs):
        for b in make_batches(enc.items, batch_size, _pad_id(tokenizer), generator=gen):
            b = {k: v.to(device) for k, v in b.items()}
            opt.zero_grad(set_to_none=True)
            loss = answer_loss(model, b).mean()
            if not torch.isfinite(loss):
                raise TrainingAborted(f"centralized training: loss is {float(loss)} at step {step + 1}; lower lr")
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if progress:
                progress(step, total, float(loss.detach()))
    model.eval()
    return {"model": model, "train_loss": float(np.mean(losses)), "steps": step,
            "seconds": time.perf_counter() - t0, "truncated": enc.truncated}
