"""Block Influence: identity blocks score 0 (last block too), padding never counts, hooks match hidden states."""

from __future__ import annotations

import pytest
import torch

from compress_helpers import TEXTS, make_identity, tiny, tok
from fedproxy_secure.compress import block_influence
from fedproxy_secure.errors import DataError, ModelError


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_identity_blocks_score_zero_including_last(arch):
    model = tiny(arch, layers=5)
    for i in (1, 4):  # 4 is the last block: HF normalises hidden_states[-1], hooks must not
        make_identity(model, i)
    bi = block_influence(model, tok(), TEXTS, batch_size=4)
    assert len(bi) == 5
    assert abs(bi[1]) < 1e-5 and abs(bi[4]) < 1e-5
    assert all(bi[i] > 1e-4 for i in (0, 2, 3))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_hidden_states_for_inner_blocks(arch):
    model = tiny(arch, layers=4)
    t = tok()
    texts = TEXTS[:3]
    bi = block_influence(model, t, texts, batch_size=3)
    enc = t(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    valid = enc["attention_mask"].bool()
    for layer in range(3):  # hidden_states[l] -> hidden_states[l+1] is block l for all but the last
        cos = torch.nn.functional.cosine_similarity(hs[layer], hs[layer + 1], dim=-1)[valid]
        assert bi[layer] == pytest.approx(1 - cos.double().mean().item(), abs=1e-5)


def test_padding_never_counts():
    model, t = tiny("llama", layers=4), tok()
    texts = ["short", TEXTS[2], "a bit longer text here", TEXTS[0]]
    one_by_one = block_influence(model, t, texts, batch_size=1)  # no padding at all
    batched = block_influence(model, t, texts, batch_size=4)  # heavy right padding
    assert batched == pytest.approx(one_by_one, abs=1e-5)


def test_empty_texts_and_unknown_architecture_fail_clearly():
    with pytest.raises(DataError, match="no tokens"):
        block_influence(tiny("llama", layers=2), tok(), ["", "   "])

    class NotAnLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(ModelError, match="cannot find the decoder block list of architecture NotAnLM"):
        block_influence(NotAnLM(), tok(), TEXTS)


def test_model_not_modified():
    model = tiny("gpt2", layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    block_influence(model, tok(), TEXTS[:4])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
