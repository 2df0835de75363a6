"""Tiny models for the compression tests: identity blocks, calibration texts."""

from __future__ import annotations

import torch

from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.models import build_tiny_model, byte_tokenizer, decoder_blocks

TEXTS = [f"Server calibration sentence {i}: the quick brown fox jumps over {i % 5} lazy dogs." * (1 + i % 3)
         for i in range(12)]


def tiny(arch: str = "llama", layers: int = 6, seed: int = 0):
    return build_tiny_model(TinyModelSpec(arch=arch, layers=layers, seed=seed))


def make_identity(model, idx: int) -> None:
    """Zero the residual-branch output projections of block ``idx``: the block returns its input."""
    _, blocks, _ = decoder_blocks(model)
    b = blocks[idx]
    with torch.no_grad():
        if hasattr(b, "self_attn"):  # Llama
            b.self_attn.o_proj.weight.zero_()
            b.mlp.down_proj.weight.zero_()
        else:  # GPT-2
            for lin in (b.attn.c_proj, b.mlp.c_proj):
                lin.weight.zero_()
                lin.bias.zero_()


def tok():
    return byte_tokenizer()
