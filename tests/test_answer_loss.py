"""Training runs the LM head only where an answer token is predicted, with the same loss and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedproxy_secure.client.batches import (IGNORE, answer_loss, answer_positions, collate, encode_examples,
                                            per_example_loss)
from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.data import load_task
from fedproxy_secure.models import build_tiny_model, byte_tokenizer

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "bigbench-mini"


def _batch():
    exs = list(load_task(DATA, "social_support", prompt_format="reference").examples[:3]) + \
        list(load_task(DATA, "navigate", prompt_format="reference").examples[:3])
    enc = encode_examples(byte_tokenizer(), exs, 160)
    return collate(enc.items, 0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_answer_loss_equals_the_full_sequence_loss_and_its_gradients(arch: str) -> None:
    torch.manual_seed(0)
    model = build_tiny_model(TinyModelSpec(arch=arch, layers=2, hidden=32, heads=2, intermediate=64, vocab=259)).eval()  # no dropout: two passes must agree
    b = _batch()
    pos = answer_positions(b["labels"])
    assert 0 < len(pos) < b["input_ids"].shape[1] - 1  # fewer positions than the sequence: something is saved
    # every scored prediction is kept: labels[:, p+1] is an answer token exactly at the kept positions
    scored = torch.nonzero((b["labels"][:, 1:] != IGNORE).any(0)).flatten()
    assert torch.equal(pos, scored)
    full = per_example_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    g_full = torch.autograd.grad(full.mean(), [p for p in model.parameters()], allow_unused=True)
    part = answer_loss(model, b)
    g_part = torch.autograd.grad(part.mean(), [p for p in model.parameters()], allow_unused=True)
    assert full.shape == part.shape == (b["input_ids"].shape[0],)
    assert torch.allclose(full, part, atol=1e-5, rtol=1e-5)
    for a, c in zip(g_full, g_part):
        if a is None or c is None:
            assert a is None and c is None or (a is not None and not a.any()) or (c is not None and not c.any())
            continue
        assert torch.allclose(a, c, atol=1e-5, rtol=1e-4)


def test_answer_loss_falls_back_for_a_forward_without_logits_to_keep() -> None:
    torch.manual_seed(0)
    inner = build_tiny_model(TinyModelSpec(arch="llama", layers=2, hidden=32, heads=2, intermediate=64, vocab=259))

    class NoKeep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = inner

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask)

    b = _batch()
    assert torch.allclose(answer_loss(NoKeep(), b),
                          per_example_loss(inner(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                           b["labels"]), atol=1e-6)
