"""Weight plug-in: bit-exact identity for zero LoRA, exact-copy equality, refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.errors import ModelError
from fedproxy_secure.fuse.adapter import deltas_from_adapter, deltas_from_peft_model
from fedproxy_secure.fuse.weight import fuse_weights
from fedproxy_secure.models import build_tiny_model, set_decoder_blocks

KEEP = [0, 2, 3, 5]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llm():
    return build_tiny_model(TinyModelSpec(layers=6, hidden=32, heads=4, intermediate=64, vocab=300, seed=1))


def _proxy(llm):
    p = copy.deepcopy(llm)
    set_decoder_blocks(p, KEEP)
    return p


def _tuned(proxy, zero_b: bool = False, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(proxy), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    if not zero_b:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return pm


def test_zero_lora_gives_bit_identical_llm(tmp_path):
    llm = _llm()
    pm = _tuned(_proxy(llm), zero_b=True)  # PEFT initialises B = 0
    pm.save_pretrained(tmp_path / "ad", safe_serialization=True)
    deltas = deltas_from_adapter(tmp_path / "ad")
    assert deltas and all(not d.any() for d in deltas.values())
    fused = fuse_weights(llm, KEEP, deltas)
    a, b = llm.state_dict(), fused.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_exact_copy_fused_blocks_equal_merged_proxy_blocks(tmp_path):
    llm = _llm()
    orig = copy.deepcopy(llm.state_dict())
    pm = _tuned(_proxy(llm))
    pm.save_pretrained(tmp_path / "ad", safe_serialization=True)
    deltas = deltas_from_adapter(tmp_path / "ad")
    # the adapter folder and the in-memory PEFT model give the same deltas
    mem = deltas_from_peft_model(pm)
    assert mem.keys() == deltas.keys()
    for k in mem:
        torch.testing.assert_close(mem[k], deltas[k], rtol=1e-6, atol=1e-7)
    fused = fuse_weights(llm, {"layer_map": KEEP, "fusion_mode": "overwrite"}, deltas)
    merged = pm.merge_and_unload().state_dict()
    fsd = fused.state_dict()
    for j, l in enumerate(KEEP):
        for k, v in merged.items():
            if k.startswith(f"model.layers.{j}."):
                sub = k[len(f"model.layers.{j}."):]
                torch.testing.assert_close(fsd[f"model.layers.{l}.{sub}"], v, rtol=0, atol=2e-7)
    # dropped blocks, embeddings, norm and head untouched; input LLM untouched
    for k, v in orig.items():
        if not any(k.startswith(f"model.layers.{l}.") for l in KEEP):
            assert torch.equal(fsd[k], v), k
        assert torch.equal(llm.state_dict()[k], v), k
    changed = [k for k in orig if not torch.equal(fsd[k], orig[k])]
    assert changed and all(any(k.startswith(f"model.layers.{l}.") for l in KEEP) for k in changed)


def test_scales_zero_for_a_block_leaves_it_untouched():
    llm = _llm()
    deltas = deltas_from_peft_model(_tuned(_proxy(llm)))
    fused = fuse_weights(llm, KEEP, deltas, scale=[0.0, 1.0, 1.0, 1.0])
    for k, v in llm.state_dict().items():
        if k.startswith("model.layers.0."):
            assert torch.equal(fused.state_dict()[k], v)
    with pytest.raises(ModelError, match="per-block scales"):
        fuse_weights(llm, KEEP, deltas, scale=[1.0, 1.0])


def test_module_missing_in_llm_is_refused():
    llm = _llm()
    deltas = deltas_from_peft_model(_tuned(_proxy(llm)))
    deltas["model.layers.1.self_attn.rotary_proj"] = torch.zeros(32, 32)
    with pytest.raises(ModelError, match="does not have"):
        fuse_weights(llm, KEEP, deltas)
    with pytest.raises(ModelError, match="not inside a decoder block"):
        fuse_weights(llm, KEEP, {"lm_head": torch.zeros(300, 32)})


def test_layer_map_outside_llm_is_refused():
    llm = _llm()
    deltas = deltas_from_peft_model(_tuned(_proxy(llm)))
    with pytest.raises(ModelError, match="outside the LLM"):
        fuse_weights(llm, [0, 2, 3, 6], deltas)
    with pytest.raises(ModelError, match="outside the LLM"):
        fuse_weights(llm, [-1, 2, 3, 5], deltas)
    with pytest.raises(ModelError, match="layer map has 3 blocks"):
        fuse_weights(llm, [0, 2, 3], deltas)


def test_pickle_adapter_is_refused(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="pickle"):
        deltas_from_adapter(d)


def test_llm_route_table_has_no_weights_route():
    """The network API never serves LLM weights (the route test lives in test_net_refusals.py)."""
    from tests.test_net_refusals import test_no_route_serves_llm_weights

    test_no_route_serves_llm_weights()
