"""Distil the proxy towards its LLM on server text: KL(LLM || proxy) on next-token distributions.

Only the proxy's decoder blocks train; embeddings, final norm and LM head stay the LLM's (they are
frozen, so fusion can write block deltas back into the LLM).
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import torch
from torch import nn

from fedproxy_secure.compress.agreement import token_kl
from fedproxy_secure.compress.influence import encode_batch
from fedproxy_secure.errors import ConfigError, DataError
from fedproxy_secure.models import decoder_blocks


def distill(
    proxy: nn.Module, llm: nn.Module, tokenizer, texts: Sequence[str], steps: int, lr: float, *,
    batch_size: int = 4, max_length: int = 256, seed: int = 0, device: str | torch.device = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Run ``steps`` AdamW steps of KL(teacher||student) on batches drawn (seeded) from ``texts``.

    Guarantees: only parameters inside the proxy's decoder blocks change (a parameter shared with
    the embeddings/head would be frozen too); ``llm`` is never modified; requires_grad flags and train
    modes are restored. Returns ``{"steps", "loss_first", "loss_last", "trainable_params"}``.
    """
    if steps < 1:
        raise ConfigError(f"compress.distill_steps: {steps} must be >= 1 when distillation is on")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise DataError("distill: no non-empty server texts to distil on")
    _, blocks, _ = decoder_blocks(proxy)
    block_ids = {id(p) for p in blocks.parameters()}
    outside_ids = {id(p) for n, p in proxy.named_parameters(remove_duplicate=False) if id(p) not in block_ids}
    flags = {id(p): p.requires_grad for p in proxy.parameters()}
    trainable = [p for p in proxy.parameters() if id(p) in block_ids and id(p) not in outside_ids]
    for p in proxy.parameters():
        p.requires_grad_(id(p) in block_ids and id(p) not in outside_ids)
    modes = (proxy.training, llm.training)
    try:
        losses = kl_match_steps(proxy, llm, tokenizer, texts, trainable, steps=steps, lr=lr, batch_size=batch_size,
                                max_length=max_length, seed=seed, device=device, on_step=on_step)
    finally:
        for p in proxy.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        proxy.train(modes[0])
        llm.train(modes[1])
    return {"steps": steps, "loss_first": losses[0], "loss_last": losses[-1],
            "trainable_params": sum(p.numel() for p in trainable)}


def kl_match_steps(
    student: nn.Module, teacher: nn.Module, tokenizer, texts: Sequence[str], trainable: list[nn.Parameter], *,
    steps: int, lr: float, batch_size: int = 4, max_length: int = 256, seed: int = 0,
    device: str | torch.device = "cpu", on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """``steps`` AdamW steps (grad-norm clip 1.0) of KL(teacher || student) over seeded batches of ``texts``.

    The one distillation loop of the SDK (proxy distillation in stage i, distil-lora fusion in
    stage iii). Guarantees: only ``trainable`` is updated; the teacher runs in eval mode without
    gradients; every text is used once per pass in a seeded order. Returns the loss per step.
    """
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    rng, order, losses = random.Random(seed), [], []
    teacher.eval()
    student.train()
    for step in range(steps):
        if len(order) < batch_size:
            perm = list(range(len(texts)))
            rng.shuffle(perm)
            order += perm
        batch, order = [texts[i] for i in order[:batch_size]], order[batch_size:]
        ids, mask = encode_batch(tokenizer, batch, max_length, device)
        with torch.no_grad():
            zt = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
        zs = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = token_kl(zt, zs)[mask.bool()].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
