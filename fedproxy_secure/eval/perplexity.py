"""Perplexity of a causal LM on plain text."""

from __future__ import annotations

import math
from typing import Sequence

import torch


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer, texts: Sequence[str], *, max_length: int = 512,
               device: str | torch.device = "cpu") -> float:
    """exp(mean next-token negative log-likelihood) over all tokens of ``texts`` (each truncated)."""
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_length].to(device)
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids.shape[1] - 1
    if count == 0:
        raise ValueError("perplexity: no text with at least two tokens")
    return math.exp(nll / count)
