"""How closely a proxy emulates its LLM: top-1 next-token agreement and KL per token."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fedproxy_secure.compress.influence import encode_batch
from fedproxy_secure.errors import DataError


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) in nats for each position: ``sum_v p_t (log p_t - log p_s)``, shape (..., )."""
    lt = torch.log_softmax(teacher_logits.float(), dim=-1)
    ls = torch.log_softmax(student_logits.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1)


@torch.no_grad()
def agreement(
    proxy: nn.Module, llm: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 8,
    max_length: int = 256, device: str | torch.device = "cpu",
) -> dict[str, float]:
    """``{"top1": share of valid positions where both argmax next tokens agree, "kl": mean KL(llm||proxy)
    in nats per valid position, "tokens": count}`` on ``texts`` (use held-out server text).

    Guarantees: padding positions never count; neither model is modified (modes restored).
    """
    texts = [t for t in texts if t and t.strip()]
    modes = (proxy.training, llm.training)
    proxy.eval()
    llm.eval()
    agree, kl_sum, count = 0, 0.0, 0
    try:
        for start in range(0, len(texts), batch_size):
            ids, mask = encode_batch(tokenizer, texts[start : start + batch_size], max_length, device)
            zt = llm(input_ids=ids, attention_mask=mask, use_cache=False).logits
            zs = proxy(input_ids=ids, attention_mask=mask, use_cache=False).logits
            valid = mask.bool()
            agree += int((zt.argmax(-1) == zs.argmax(-1))[valid].sum())
            kl_sum += float(token_kl(zt, zs)[valid].double().sum())
            count += int(valid.sum())
    finally:
        proxy.train(modes[0])
        llm.train(modes[1])
    if count == 0:
        raise DataError("agreement: the held-out texts hold no tokens; give non-empty server text")
    return {"top1": agree / count, "kl": kl_sum / count, "tokens": count}
