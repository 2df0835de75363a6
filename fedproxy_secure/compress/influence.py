"""Block Influence (ShortGPT, arXiv 2403.03853): how much each decoder block changes its input.

``BI_l = 1 - mean over valid (non-padding) tokens of cos(h_in[l, t], h_out[l, t])``.

Block inputs/outputs are captured with forward hooks on the blocks themselves, not from
``output_hidden_states``: Hugging Face applies the final norm to the *last* hidden state of Llama and
GPT-2, so ``hidden_states[L]`` is not the raw output of the last block.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from fedproxy_secure.errors import DataError
from fedproxy_secure.models import decoder_blocks


def _first_tensor(x: object) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    raise TypeError(f"decoder block output of type {type(x).__name__} holds no hidden-state tensor")


def encode_batch(tokenizer, texts: Sequence[str], max_length: int, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` of ``texts``, cut at ``max_length`` tokens."""
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                    add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def block_influence(
    model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 256,
    device: str | torch.device = "cpu", on_batch: Callable[[int], None] | None = None,
) -> list[float]:
    """BI score of every decoder block of ``model`` on ``texts`` (one float per block, block order).

    Guarantees: padding tokens never count; a block that returns its input unchanged scores 0;
    the model's weights and mode are left as they were. Raises DataError if ``texts`` yields no token.
    """
    _, blocks, _ = decoder_blocks(model)
    n = len(blocks)
    inputs: list[torch.Tensor | None] = [None] * n
    outputs: list[torch.Tensor | None] = [None] * n
    handles = []

    def pre_hook(i: int):
        def fn(module, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            inputs[i] = _first_tensor(h).detach()
        return fn

    def post_hook(i: int):
        def fn(module, args, kwargs, out):
            outputs[i] = _first_tensor(out).detach()
        return fn

    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(b.register_forward_hook(post_hook(i), with_kwargs=True))
    sums = torch.zeros(n, dtype=torch.float64)
    count = 0
    was_training = model.training
    model.eval()
    try:
        texts = [t for t in texts if t and t.strip()]
        for start in range(0, len(texts), batch_size):
            ids, mask = encode_batch(tokenizer, texts[start : start + batch_size], max_length, device)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            valid = mask.bool()
            for i in range(n):
                cos = torch.nn.functional.cosine_similarity(inputs[i].float(), outputs[i].float(), dim=-1, eps=1e-8)
                sums[i] += cos[valid].double().sum().cpu()
            count += int(valid.sum())
            if on_batch is not None:
                on_batch(len(ids))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise DataError("calibration: the calibration texts hold no tokens; give non-empty server text")
    return [float(1.0 - s / count) for s in sums]
