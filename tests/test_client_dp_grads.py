"""Per-sample LoRA gradients under opacus equal one-example-at-a-time gradients (guards opacus#820)."""

from __future__ import annotations

import pytest
import torch

from client_helpers import pairs, tiny_peft, tok
from fedproxy_secure.client.batches import collate, encode_examples, per_example_loss
from fedproxy_secure.lora import lora_names, trainable_lora_params
from fedproxy_secure.privacy.dp_sgd import dropout_off, make_grad_sample_module


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("ffa", [True, False])
def test_per_sample_grads_match_loop(arch: str, ffa: bool) -> None:
    torch.manual_seed(0)
    model = tiny_peft(arch, ffa=ffa)
    params = trainable_lora_params(model)
    with torch.no_grad():  # B non-zero so that A's gradients are non-trivial too
        for p in params:
            p.add_(0.05 * torch.randn(p.shape))
    t = tok()
    items = encode_examples(t, pairs(6), 64).items
    assert len({len(e.ids) for e in items}) > 1  # padding is exercised
    model.train()
    with dropout_off(model):
        ref = []
        for e in items:
            b = collate([e], t.pad_token_id)
            loss = per_example_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                    b["labels"]).sum()
            ref.append(torch.autograd.grad(loss, params))
        gsm = make_grad_sample_module(model)
        try:
            b = collate(items, t.pad_token_id)
            out = gsm(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            per_example_loss(out.logits, b["labels"]).mean().backward()
            names = lora_names(model)
            assert any(".lora_B." in n for n in names)
            assert any(".lora_A." in n for n in names) == (not ffa)
            for j, (name, p) in enumerate(zip(names, params)):
                assert p.grad_sample.shape == (len(items), *p.shape), name
                for i in range(len(items)):
                    want = ref[i][j]
                    assert want.abs().max() > 0, name
                    torch.testing.assert_close(p.grad_sample[i], want, rtol=1e-4, atol=1e-6, msg=name)
        finally:
            gsm._close()
