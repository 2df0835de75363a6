"""Fusion beyond the three plug-ins: distil the logit plug-in into a LoRA on the LLM itself (server text only).

Teacher: the fused logit module ``z_llm + β·(z_tuned − z_base)``. Student: the LLM with a fresh LoRA on
every linear layer of its decoder blocks, trained on KL(teacher || student) over next-token
distributions of the server's own text (never client data). The LoRA is merged, so the result is a
plain dense model any Hugging Face stack serves at the LLM's cost per token.
"""

from __future__ import annotations

import copy
import random
from typing import Callable, Sequence

import torch
from torch import nn

from fedproxy_secure.compress.agreement import token_kl
from fedproxy_secure.compress.distill import kl_match_steps
from fedproxy_secure.compress.influence import encode_batch
from fedproxy_secure.errors import ConfigError, DataError
from fedproxy_secure.models.blocks import decoder_blocks


def block_linear_names(model: nn.Module) -> list[str]:
    """Suffix names of the linear layers inside the decoder blocks (e.g. q_proj ... down_proj; c_attn for GPT-2)."""
    _, blocks, _ = decoder_blocks(model)
    names = {n.rsplit(".", 1)[-1] for n, m in blocks.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
    if not names:
        raise ConfigError("distil-lora: the LLM's decoder blocks have no linear layers to put a LoRA on")
    return sorted(names)


@torch.no_grad()
def mean_token_kl(teacher: nn.Module, student: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 8,
                  max_length: int = 256) -> float:
    """Mean KL(teacher || student) in nats per non-padding position over ``texts`` (no model is changed)."""
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        ids, mask = encode_batch(tokenizer, texts[start:start + batch_size], max_length, "cpu")
        zt = teacher(input_ids=ids, attention_mask=mask).logits
        zs = student(input_ids=ids, attention_mask=mask).logits
        kl = token_kl(zt, zs)[mask.bool()]
        total, count = total + float(kl.sum()), count + int(kl.numel())
    if count == 0:
        raise DataError("distil-lora: the held-out server texts have no tokens")
    return total / count


def distil_into_lora(
    teacher: nn.Module, llm: nn.Module, tokenizer, texts: Sequence[str], heldout: Sequence[str], *,
    steps: int = 200, lr: float = 1e-4, r: int = 8, alpha: float = 16.0, batch_size: int = 4, max_length: int = 256,
    seed: int = 0, on_step: Callable[[int, float], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Train a LoRA on a copy of ``llm`` so its next-token distributions match ``teacher``'s; return (dense model, stats).

    Guarantees: ``llm`` and ``teacher`` are not modified; only LoRA parameters train; the returned
    model is the copy with the LoRA merged (a dense HF model). ``stats`` holds the held-out
    KL(teacher || LLM) before and KL(teacher || student) after, in nats per token, and the loss curve ends.
    """
    from peft import LoraConfig, get_peft_model

    if steps < 1 or not lr > 0 or r < 1:
        raise ConfigError(f"distil-lora: steps={steps}, lr={lr}, rank={r} must be >= 1, > 0, >= 1")
    texts = [t for t in texts if t and t.strip()]
    heldout = [t for t in heldout if t and t.strip()]
    if not texts or not heldout:
        raise DataError("distil-lora: needs non-empty server training texts and held-out server texts")
    torch.manual_seed(seed)
    student = get_peft_model(copy.deepcopy(llm), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                            target_modules=block_linear_names(llm)))
    teacher.eval()
    kl_before = mean_token_kl(teacher, llm, tokenizer, heldout, max_length=max_length)
    trainable = [p for p in student.parameters() if p.requires_grad]
    losses = kl_match_steps(student, teacher, tokenizer, texts, trainable, steps=steps, lr=lr, batch_size=batch_size,
                            max_length=max_length, seed=seed, on_step=on_step)
    merged = student.merge_and_unload().eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    kl_after = mean_token_kl(teacher, merged, tokenizer, heldout, max_length=max_length)
    return merged, {"steps": steps, "lr": lr, "rank": r, "alpha": alpha, "train_texts": len(texts),
                    "heldout_texts": len(heldout), "loss_first": losses[0], "loss_last": losses[-1],
                    "heldout_kl_llm": kl_before, "heldout_kl_student": kl_after}


def split_server_texts(texts: Sequence[str], *, seed: int = 0, heldout_share: float = 0.2,
                       max_heldout: int = 64) -> tuple[list[str], list[str]]:
    """Seeded split of server texts into (train, held-out); both non-empty, held-out at most ``max_heldout``."""
    texts = [t for t in texts if t and t.strip()]
    if len(texts) < 2:
        raise DataError(f"--server-text: {len(texts)} non-empty texts; distil-lora needs at least 2 (train + held-out)")
    idx = list(range(len(texts)))
    random.Random(seed).shuffle(idx)
    k = max(1, min(max_heldout, int(len(texts) * heldout_share)))
    return [texts[i] for i in idx[k:]], [texts[i] for i in idx[:k]]
