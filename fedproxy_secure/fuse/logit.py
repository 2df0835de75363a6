"""Logit plug-in (proxy-tuning, arXiv 2401.08565): ``z = z_llm + β·(z_proxy_tuned − z_proxy_base)``.

The proxy shares the LLM's tokenizer and vocabulary (it is cut from the LLM), so the logits are
added position by position. The result is a ``logits_fn(input_ids, attention_mask)`` accepted by
:func:`fedproxy_secure.eval.evaluate_tasks`, and a greedy generator built on it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fedproxy_secure.errors import ModelError

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _vocab(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def logit_plugin_fn(llm: nn.Module, proxy_tuned: nn.Module, proxy_base: nn.Module, beta: float = 1.0) -> LogitsFn:
    """Return ``fn(ids, mask) -> z_llm + β (z_tuned − z_base)`` (float32 logits, LLM vocabulary).

    Guarantees: with β = 0, or when the tuned and base proxies are the same weights, the output
    equals the LLM's logits. Raises ModelError if the vocabularies differ or β is not finite/≥ 0.
    """
    if not (beta >= 0.0 and beta < float("inf")):
        raise ModelError(f"logit plug-in: beta={beta} must be a finite number >= 0")
    v = {_vocab(llm), _vocab(proxy_tuned), _vocab(proxy_base)}
    if len(v) != 1:
        raise ModelError(f"logit plug-in: vocabulary sizes differ {sorted(v)}; the proxy must share the LLM's tokenizer")

    @torch.no_grad()
    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = llm(input_ids=ids, attention_mask=mask).logits.float()
        if beta == 0.0:
            return z
        zt = proxy_tuned(input_ids=ids, attention_mask=mask).logits.float()
        zb = proxy_base(input_ids=ids, attention_mask=mask).logits.float()
        return z + beta * (zt - zb)

    return fn


@torch.no_grad()
def generate_greedy(logits_fn: LogitsFn, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy decoding with any logits function (no KV cache: simple, for short answers)."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    start = ids.shape[1]
    eos = tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        nxt = logits_fn(ids, torch.ones_like(ids))[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        if eos is not None and int(nxt) == eos:
            break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)
