"""DP-SGD with opacus on a peft LoRA model: per-sample gradients of the trainable LoRA weights only.

``GradSampleModule`` (hooks mode) computes per-example gradients of every trainable parameter — the
LoRA ``nn.Linear`` factors; the frozen base model gets no hooks. ``DPOptimizer`` clips each example's
gradient to ``max_grad_norm``, sums, adds N(0, σ²·max_grad_norm²) and divides by the *expected* batch
size (Poisson sampling: the real batch size varies and may be 0; an empty batch still takes a noisy
step, as the accountant assumes). Dropout is switched off (p = 0) while training under DP.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def make_grad_sample_module(model: nn.Module) -> nn.Module:
    """Wrap ``model`` for per-sample gradients (hooks mode, batch first, mean loss reduction).

    The caller's loss must be the *mean over examples* of per-example losses.
    """
    from opacus import GradSampleModule

    return GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)


def make_dp_optimizer(optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                      expected_batch_size: int, generator: torch.Generator | None = None):
    """opacus DPOptimizer around ``optimizer`` (clip per example, add noise, divide by expected batch)."""
    from opacus.optimizers import DPOptimizer

    return DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                       expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator)


def set_empty_grad_samples(params: list[nn.Parameter]) -> None:
    """Give each parameter a zero-length per-sample gradient (an empty Poisson batch)."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def poisson_batch(n: int, sample_rate: float, generator: torch.Generator) -> list[int]:
    """Indices of one Poisson-sampled batch: each of ``n`` examples independently with prob. ``sample_rate``."""
    return torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten().tolist()


@contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """Set every ``nn.Dropout`` in ``model`` to p = 0 (and GPT-2/Llama attention dropout), restore after."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            saved.append((m, "p", m.p))
            m.p = 0.0
        if hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float):
            saved.append((m, "attention_dropout", m.attention_dropout))
            m.attention_dropout = 0.0
    try:
        yield
    finally:
        for m, attr, v in saved:
            setattr(m, attr, v)
