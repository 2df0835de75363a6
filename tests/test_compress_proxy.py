"""compress(): exact-copy blocks per layer_map, LLM untouched, distillation trains blocks only, proxy folder I/O."""

from __future__ import annotations

import json

import pytest
import torch

from compress_helpers import TEXTS, make_identity, tiny, tok
from fedproxy_secure.compress import compress, load_proxy_meta, save_proxy, select_blocks
from fedproxy_secure.config import CompressConfig
from fedproxy_secure.errors import ConfigError, DataError
from fedproxy_secure.models import decoder_blocks


def _block_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bi_proxy_keeps_top_k_exact_copies(arch):
    llm = tiny(arch, layers=6)
    for i in (1, 3):
        make_identity(llm, i)
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    p = compress(llm, tok(), TEXTS, CompressConfig(strategy="bi", keep_ratio=0.5), heldout_texts=TEXTS[:3], progress=False)
    m = p.meta
    assert m["layer_map"] == select_blocks(m["bi_scores"], 0.5)
    assert 1 not in m["layer_map"] and 3 not in m["layer_map"] and len(m["layer_map"]) == 3
    _, lb, _ = decoder_blocks(llm)
    _, pb, _ = decoder_blocks(p.model)
    assert len(pb) == 3 and len(lb) == 6  # the LLM keeps all its blocks
    for j, l in enumerate(m["layer_map"]):
        assert _block_equal(pb[j], lb[l])
    assert all(torch.equal(before[k], v) for k, v in llm.state_dict().items())
    assert p.model.config.num_hidden_layers == 3 and llm.config.num_hidden_layers == 6
    emb_l, emb_p = llm.get_input_embeddings().weight, p.model.get_input_embeddings().weight
    assert torch.equal(emb_l, emb_p) and emb_l.data_ptr() != emb_p.data_ptr()
    assert m["fusion_mode"] == "overwrite" and m["distilled"] is False and m["ot_adapter_blocks"] is None
    assert m["n_layers_llm"] == 6 and m["n_layers_proxy"] == 3 and m["n_params_proxy"] < m["n_params_llm"]
    assert 0.0 <= m["agreement"]["before"]["top1"] <= 1.0 and "after" not in m["agreement"]
    ids = tok()(["generate from here"], return_tensors="pt")
    assert p.model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 4


def test_uniform_records_adapter_split():
    p = compress(tiny("llama", layers=8), tok(), TEXTS, CompressConfig(strategy="uniform", keep_ratio=0.75,
                 ot_adapter_blocks=2), progress=False)
    assert p.meta["layer_map"] == [0, 1, 2, 5, 6, 7]  # middle 2..5, m = 2, stride 3
    assert p.meta["layer_map"][:2] == [0, 1] and p.meta["layer_map"][-2:] == [6, 7]
    assert p.meta["ot_adapter_blocks"] == 2 and p.meta["ot_adapter_proxy_blocks"] == [0, 1, 4, 5]
    assert len(p.meta["bi_scores"]) == 8


def test_distillation_trains_blocks_only_and_improves_agreement():
    llm = tiny("llama", layers=6)
    cfg = CompressConfig(strategy="bi", keep_ratio=0.5, distill=True, distill_steps=30, distill_lr=3e-3)
    p = compress(llm, tok(), TEXTS, cfg, heldout_texts=TEXTS[:4], progress=False)
    m = p.meta
    assert m["distilled"] is True and m["fusion_mode"] == "delta"
    assert m["agreement"]["after"]["kl"] < m["agreement"]["before"]["kl"]
    assert m["distill"]["loss_last"] < m["distill"]["loss_first"]
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(p.model.state_dict()[name], llm.state_dict()[name]), name
    _, pb, _ = decoder_blocks(p.model)
    _, lb, _ = decoder_blocks(llm)
    assert not _block_equal(pb[0], lb[m["layer_map"][0]])  # blocks did change
    assert all(q.requires_grad for q in p.model.parameters())  # flags restored


def test_empty_calibration_and_bad_distill_config():
    with pytest.raises(DataError, match="calibration set is empty"):
        compress(tiny(), tok(), ["", "  "], CompressConfig(), progress=False)
    with pytest.raises(ConfigError, match="distill_steps"):
        compress(tiny(), tok(), TEXTS, CompressConfig(distill=True, distill_steps=0), progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_loads_with_auto_model_and_refuses_non_empty(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    llm = tiny(arch, layers=4)
    t = tok()
    p = compress(llm, t, TEXTS, CompressConfig(keep_ratio=0.5), progress=False)
    out = save_proxy(p, t, tmp_path / "proxy", base_model_hash="ab" * 32)
    assert sorted(f.name for f in out.iterdir() if f.suffix in {".bin", ".pt", ".pth"}) == []
    assert (out / "model.safetensors").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == 2
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = t(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(loaded(**ids).logits, p.model(**ids).logits, atol=1e-5)
    meta = load_proxy_meta(out)
    assert meta["base_model_hash"] == "ab" * 32 and meta["layer_map"] == p.meta["layer_map"]
    assert len(meta["calib_hash"]) == 64
    with pytest.raises(ConfigError, match="not an empty folder"):
        save_proxy(p, t, out, base_model_hash="ab" * 32)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp dirs left


def test_save_failure_leaves_nothing(tmp_path):
    p = compress(tiny(), tok(), TEXTS, CompressConfig(), progress=False)

    class BadTok:
        def save_pretrained(self, d):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_proxy(p, BadTok(), tmp_path / "proxy", base_model_hash="x")
    assert list(tmp_path.iterdir()) == []
