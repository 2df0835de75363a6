"""Tiny models, tokenizer and data for the client-trainer and privacy tests."""

from __future__ import annotations

from fedproxy_secure.config import LoraConfig, TinyModelSpec
from fedproxy_secure.data import MCExample, PromptResponse
from fedproxy_secure.lora import attach_lora
from fedproxy_secure.models import build_tiny_model, byte_tokenizer


def tiny(arch: str = "llama", seed: int = 0, max_positions: int = 128):
    """A 2-block tiny model of ``arch`` (llama or gpt2)."""
    return build_tiny_model(TinyModelSpec(arch=arch, layers=2, hidden=32, heads=2, intermediate=64, vocab=300,
                                          max_positions=max_positions, seed=seed))


def tiny_peft(arch: str = "llama", ffa: bool = True, a_seed: int = 7, r: int = 4, seed: int = 0, **kw):
    """A tiny model with LoRA attached."""
    return attach_lora(tiny(arch, seed=seed, **kw), LoraConfig(r=r, alpha=8, ffa=ffa), a_seed)


def tok():
    return byte_tokenizer()


def pairs(n: int = 12) -> list:
    """Prompt/response and multiple-choice examples of varying lengths."""
    out = []
    for i in range(n):
        if i % 2:
            out.append(PromptResponse(f"Q: what is {i} plus {i}?" + " pad" * (i % 5), f" {2 * i}"))
        else:
            out.append(MCExample(prompt=f"Is {i} even?\nA:", choices=(" yes", " no"), answer=0, task="t"))
    return out
