"""Per-block delta scales chosen on SERVER data by a training-free scalar search.

Objective: the fused LLM should move its next-token distribution the way the tuned proxy moved
its own, i.e. emulate the logit plug-in target ``softmax(z_llm + Δz_proxy)`` on server-held text
(never client data). The search changes only scalars ``s_j`` in ``W[l_j] += s_j·ΔW_j``: a global
grid first, then one coordinate pass over blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from fedproxy_secure.fuse.weight import ProxyMapping, fuse_weights
from fedproxy_secure.models.blocks import decoder_blocks

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class CalibrationResult:
    """Chosen per-block scales, the objective at scale 1 and at the choice, and the search trace."""

    scales: list[float]
    loss_at_one: float
    loss_best: float
    trace: list[dict] = field(default_factory=list)


def encode_texts(tok, texts: Sequence[str], max_length: int = 192) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded batches of 8 texts (ids, mask)."""
    out = []
    for i in range(0, len(texts), 8):
        enc = tok(list(texts[i:i + 8]), return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                  add_special_tokens=False)
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


@torch.no_grad()
def _target_logprobs(target_fn: LogitsFn, batches) -> list[torch.Tensor]:
    return [torch.log_softmax(target_fn(ids, m).float(), -1) for ids, m in batches]


@torch.no_grad()
def _kl(model: nn.Module, batches, targets) -> float:
    tot, n = 0.0, 0
    for (ids, m), t in zip(batches, targets):
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=m).logits.float(), -1)
        kl = (t.exp() * (t - lp)).sum(-1)  # KL(target || fused) per token
        tot += float((kl * m).sum())
        n += int(m.sum())
    return tot / max(n, 1)


@torch.no_grad()
def calibrate_block_scales(
    llm: nn.Module, proxy: ProxyMapping | Mapping | Sequence[int], deltas: Mapping[str, torch.Tensor],
    target_fn: LogitsFn, tok, server_texts: Sequence[str], *,
    global_grid: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 3.0), block_factors: Sequence[float] = (0.0, 2.0),
    max_length: int = 192, progress: Callable[[str], None] | None = None,
) -> CalibrationResult:
    """Scales ``s_j`` minimising KL(target || fused LLM) per token on ``server_texts``.

    Guarantees: the input LLM is not modified; the returned objective at the chosen scales is no
    larger than at scale 1 (scale 1 is always a candidate); deterministic for fixed inputs.
    """
    mapping = ProxyMapping.coerce(proxy)
    n = len(mapping.layer_map)
    dev = next(llm.parameters()).device  # the server text and the deltas go where the LLM is
    batches = [(ids.to(dev), m.to(dev)) for ids, m in encode_texts(tok, server_texts, max_length)]
    targets = _target_logprobs(target_fn, batches)
    work = fuse_weights(llm, mapping, {k: torch.zeros_like(v) for k, v in deltas.items()})  # a copy
    block_path, _, _ = decoder_blocks(work)
    params = dict(work.named_parameters())
    orig = {}
    per_block: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, d in deltas.items():
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        j = int(base.split(block_path + ".", 1)[1].split(".", 1)[0])
        sub = base.split(f"{block_path}.{j}.", 1)[1]
        target = f"{block_path}.{mapping.layer_map[j]}.{sub}.weight"
        orig[target] = params[target].detach().clone()
        per_block.setdefault(j, []).append((target, d.float().to(dev)))

    def set_scales(s: list[float]) -> None:
        for j, items in per_block.items():
            for target, d in items:
                params[target].copy_(orig[target] + s[j] * d)

    trace = []

    def loss_of(s: list[float]) -> float:
        set_scales(s)
        val = _kl(work, batches, targets)
        trace.append({"scales": [round(x, 4) for x in s], "kl": val})
        if progress:
            progress(f"calibrate: kl={val:.4f} scales={[round(x, 2) for x in s]}")
        return val

    one = loss_of([1.0] * n)
    best_s, best = [1.0] * n, one
    for g in global_grid:
        if g == 1.0:
            continue
        v = loss_of([g] * n)
        if v < best:
            best_s, best = [g] * n, v
    for j in sorted(per_block):
        for f in block_factors:
            cand = list(best_s)
            cand[j] = best_s[j] * f
            if cand[j] == best_s[j]:
                continue
            v = loss_of(cand)
            if v < best:
                best_s, best = cand, v
    return CalibrationResult(scales=best_s, loss_at_one=one, loss_best=best, trace=trace)
