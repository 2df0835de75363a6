"""Servable fused folders: load_fused logits equal the formula, zero LoRA = LLM, generate, signatures, contents."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from fedproxy_secure.artifacts import create_keyset, generate_key, issue_bundle, verify_bundle
from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.errors import ModelError, SecurityError
from fedproxy_secure.fuse import (
    FusedLogitModel, generate_text, load_fused, load_fused_model, parameter_bytes, write_dense_folder, write_logit_folder,
)
from fedproxy_secure.fuse.served import build_shared_proxy
from fedproxy_secure.fuse.signed import verify_fused_folder
from fedproxy_secure.models import load_causal_lm, set_decoder_blocks
from fedproxy_secure.models.tiny import save_tiny_llm
from tests.artifacts_helpers import flip_byte

SPEC = TinyModelSpec(layers=6, hidden=32, heads=4, intermediate=64, vocab=300, seed=5)
KEEP = [0, 2, 3, 5]
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
BETA = 0.7


def _adapter(proxy, out: Path, *, zero: bool = False, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(proxy), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    if not zero:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    pm.save_pretrained(out, safe_serialization=True)
    return pm.eval()


def _proxy_folder(llm, out: Path, *, distilled: bool = False):
    proxy = copy.deepcopy(llm)
    set_decoder_blocks(proxy, KEEP)
    if distilled:  # a distilled proxy: its blocks drift away from the LLM's
        torch.manual_seed(11)
        with torch.no_grad():
            for n, p in proxy.named_parameters():
                if ".layers." in n:
                    p.add_(torch.randn_like(p) * 0.02)
    proxy.save_pretrained(out, safe_serialization=True)
    meta = {"layer_map": KEEP, "fusion_mode": "delta" if distilled else "overwrite", "distilled": distilled,
            "base_model_hash": "h" * 64}
    (out / "fedproxy.json").write_text(json.dumps(meta))
    return proxy.eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("serve")
    llm_dir = save_tiny_llm(SPEC, tmp / "llm")
    llm = load_causal_lm(llm_dir)
    proxy = _proxy_folder(llm, tmp / "proxy")
    tuned = _adapter(proxy, tmp / "adapter")
    key = generate_key()
    ks = create_keyset(key, name="op")
    out = tmp / "fused"
    write_logit_folder(llm_dir, tmp / "proxy", tmp / "adapter", out, key, beta=BETA, source_round=3)
    return {"tmp": tmp, "llm_dir": llm_dir, "llm": llm, "proxy": proxy, "tuned": tuned, "key": key, "ks": ks, "out": out}


def _ids(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # one right-padded row
    return ids, mask


def test_load_fused_logits_equal_the_formula_at_every_position(env):
    model = load_fused(env["out"], env["ks"])
    assert isinstance(model, FusedLogitModel) and model.beta == BETA
    assert json.loads((env["out"] / "fused.json").read_text())["beta"] == BETA
    ids, mask = _ids()
    got = model(ids, attention_mask=mask).logits
    z = env["llm"](input_ids=ids, attention_mask=mask).logits
    zt = env["tuned"](input_ids=ids, attention_mask=mask).logits
    zb = env["proxy"](input_ids=ids, attention_mask=mask).logits
    assert got.shape == z.shape == (3, 11, 300)
    want = z + BETA * (zt - zb)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (zt - zb).abs().max() > 1e-3  # the adapter does move the proxy, so the check has teeth
    torch.testing.assert_close(model(ids).logits, model(ids, torch.ones_like(ids)).logits, rtol=0, atol=0)


def test_proxy_blocks_are_shared_not_duplicated(env):
    model = load_fused(env["out"], env["ks"])
    meta = model.fused_meta
    assert meta["proxy_shares_llm_blocks"] is True and meta["proxy_own_tensors"] == []
    assert not (env["out"] / "proxy" / "own.safetensors").exists()
    llm_ptrs = {p.data_ptr() for p in model.llm.parameters()}
    base = [p for n, p in model.proxy.named_parameters() if "lora_" not in n]
    assert base and all(p.data_ptr() in llm_ptrs for p in base)
    lora = sum(p.numel() * p.element_size() for n, p in model.proxy.named_parameters() if "lora_" in n)
    extra = parameter_bytes(model) - parameter_bytes(model.llm)
    assert lora <= extra <= lora + 4096  # LoRA plus the proxy's rotary buffer, never a second copy of the blocks
    assert extra < 0.2 * parameter_bytes(model.llm)


def test_zero_lora_gives_exactly_the_llm_logits(env, tmp_path):
    _adapter(env["proxy"], tmp_path / "zero", zero=True)
    out = tmp_path / "fz"
    write_logit_folder(env["llm_dir"], env["tmp"] / "proxy", tmp_path / "zero", out, env["key"], beta=1.0)
    model = load_fused(out, env["ks"])
    ids, mask = _ids(1)
    assert torch.equal(model(ids, mask).logits, env["llm"](input_ids=ids, attention_mask=mask).logits.float())


def test_generate_returns_text_and_cache_matches_plain_greedy(env):
    model = load_fused(env["out"], env["ks"])
    text = generate_text(model, "The answer is", max_new_tokens=6)
    assert isinstance(text, str) and len(text) > 0
    ids = torch.tensor([model.tokenizer("Hello there", add_special_tokens=False)["input_ids"]])
    a = model.generate(ids, max_new_tokens=7)
    b = model.generate(ids, max_new_tokens=7, use_cache=False)
    assert torch.equal(a, b) and a.shape[1] > ids.shape[1]
    # the first new token is the argmax of forward()'s fused logits
    assert int(a[0, ids.shape[1]]) == int(model(ids).logits[0, -1].argmax())


def test_folder_holds_only_model_tokenizer_adapter_metadata_manifest(env):
    files = sorted(str(p.relative_to(env["out"])) for p in env["out"].rglob("*") if p.is_file())
    allowed_top = {"MANIFEST.json", "MANIFEST.sig", "fused.json"}
    for f in files:
        top = f.split("/")[0]
        assert f in allowed_top or top in {"llm", "proxy", "adapter"}, f
    assert "adapter/adapter_model.safetensors" in files and "llm/model.safetensors" in files
    assert "llm/tokenizer.json" in files and "proxy/config.json" in files
    assert not [f for f in files if f.startswith("proxy/") and f.endswith(".safetensors")]
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".jsonl", ".csv", ".parquet")) for f in files)
    cfg = json.loads((env["out"] / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] is None  # no server path leaks into the folder
    meta_text = (env["out"] / "fused.json").read_text()
    assert str(env["tmp"]) not in meta_text


def test_signature_verifies_and_tampering_or_wrong_key_is_refused_before_load(env, tmp_path, monkeypatch):
    import shutil

    import fedproxy_secure.fuse.load as load_mod

    vf = verify_fused_folder(env["out"], env["ks"])
    assert vf.manifest.method == "logit" and vf.signer.key_id == vf.manifest.key_id

    def boom(*a, **k):
        raise AssertionError("a model file was parsed before verification")

    monkeypatch.setattr(load_mod, "_causal_lm", boom)
    monkeypatch.setattr(load_mod, "_load_logit", boom)
    # wrong key
    other = create_keyset(generate_key(), name="op")
    with pytest.raises(SecurityError, match="does not verify"):
        load_fused(env["out"], other)
    # a flipped byte in the adapter
    bad = tmp_path / "bad"
    shutil.copytree(env["out"], bad)
    flip_byte(bad / "adapter" / "adapter_model.safetensors")
    with pytest.raises(SecurityError, match="tampered"):
        load_fused(bad, env["ks"])
    # an edited beta in fused.json
    bad2 = tmp_path / "bad2"
    shutil.copytree(env["out"], bad2)
    meta = json.loads((bad2 / "fused.json").read_text())
    meta["beta"] = 5.0
    (bad2 / "fused.json").write_text(json.dumps(meta))
    with pytest.raises(SecurityError):
        load_fused_model(bad2, env["ks"])
    # an extra (pickle) file
    bad3 = tmp_path / "bad3"
    shutil.copytree(env["out"], bad3)
    (bad3 / "llm" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(SecurityError, match="extra"):
        load_fused(bad3, env["ks"])


def test_fused_folder_and_proxy_bundle_are_never_confused(env, tmp_path):
    # a fused folder does not verify as a proxy bundle ...
    with pytest.raises(SecurityError):
        verify_bundle(env["out"], env["ks"], state_dir=tmp_path / "state")
    # ... and a proxy bundle signed by the same key does not verify as a fused folder
    bundle = tmp_path / "bundle"
    issue_bundle(env["tmp"] / "proxy", env["key"], version=1, valid_days=5, out_dir=bundle)
    verify_bundle(bundle, env["ks"], state_dir=tmp_path / "state")  # a valid bundle
    with pytest.raises(SecurityError):
        load_fused_model(bundle, env["ks"])


def test_distilled_proxy_stores_its_own_blocks_and_matches_the_formula(env, tmp_path):
    llm = env["llm"]
    proxy = _proxy_folder(llm, tmp_path / "dproxy", distilled=True)
    tuned = _adapter(proxy, tmp_path / "dad", seed=1)
    out = tmp_path / "dfused"
    meta = write_logit_folder(env["llm_dir"], tmp_path / "dproxy", tmp_path / "dad", out, env["key"], beta=1.0)
    assert meta["distilled"] is True and meta["proxy_shares_llm_blocks"] is False
    assert meta["proxy_own_tensors"] and all(".layers." in n for n in meta["proxy_own_tensors"])
    assert (out / "proxy" / "own.safetensors").is_file()
    model = load_fused(out, env["ks"])
    ids, mask = _ids(2)
    want = (llm(input_ids=ids, attention_mask=mask).logits
            + tuned(input_ids=ids, attention_mask=mask).logits - proxy(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(model(ids, mask).logits, want, rtol=0, atol=1e-5)
    llm_ptrs = {p.data_ptr() for p in model.llm.parameters()}
    emb = model.proxy.get_input_embeddings().weight
    assert emb.data_ptr() in llm_ptrs  # embeddings / head are still shared


def test_dense_folders_load_through_the_same_entry_point(env, tmp_path):
    from fedproxy_secure.fuse import deltas_from_adapter, fuse_weights

    out = tmp_path / "dense"
    rec = write_dense_folder(env["llm_dir"], env["tmp"] / "proxy", env["tmp"] / "adapter", out, env["key"], method="weight")
    assert rec["method"] == "weight" and (out / "fusion.json").is_file()
    model = load_fused_model(out, env["ks"])
    assert model.fused_meta["method"] == "weight" and model.tokenizer is not None
    ref = fuse_weights(env["llm"], KEEP, deltas_from_adapter(env["tmp"] / "adapter"))
    ids, mask = _ids(3)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               ref(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5)
    assert isinstance(generate_text(model, "Hi", max_new_tokens=3), str)
    with pytest.raises(ModelError, match="dense"):
        load_fused(out, env["ks"])
    with pytest.raises(Exception, match="distil"):
        write_dense_folder(env["llm_dir"], env["tmp"] / "proxy", env["tmp"] / "adapter", tmp_path / "d2", env["key"],
                           method="delta")
    assert not (tmp_path / "d2").exists()


def test_build_shared_proxy_refuses_a_layer_map_of_the_wrong_length(env):
    with pytest.raises(ModelError, match="layer map"):
        build_shared_proxy(env["llm"], env["proxy"].config, [0, 1, 2])


def test_fuse_package_never_imports_the_client_package():
    import ast

    root = Path(__file__).resolve().parents[1] / "fedproxy_secure" / "fuse"
    files = list(root.glob("*.py"))
    assert files
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("fedproxy_secure.client"), f
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("fedproxy_secure.client") for a in node.names), f


def test_logit_metadata_is_validated_with_the_field_named():
    from fedproxy_secure.fuse.load import parse_logit_meta

    ok = parse_logit_meta({"method": "logit", "beta": 0.5, "layer_map": [0, 2], "extra": 1})
    assert ok.beta == 0.5 and ok.layer_map == [0, 2] and ok.proxy_own_tensors == []
    for bad, field in (({"method": "logit", "beta": -1, "layer_map": [0]}, "beta"),
                       ({"method": "logit", "beta": float("nan"), "layer_map": [0]}, "beta"),
                       ({"method": "logit", "beta": 1.0, "layer_map": []}, "layer_map"),
                       ({"method": "weight", "beta": 1.0, "layer_map": [0]}, "method")):
        with pytest.raises(ModelError, match=field):
            parse_logit_meta(bad)


def test_hf_cache_protocol_matches_the_full_forward(env):
    """Prefix once with use_cache, repeat the cache per choice, continue with position ids (as the evaluator does)."""
    model = load_fused(env["out"], env["ks"])
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(3, 300, (1, 6), generator=g)
    tails = torch.randint(3, 300, (3, 4), generator=g)
    res = model(prefix, attention_mask=torch.ones_like(prefix), use_cache=True, logits_to_keep=1)
    assert res.logits.shape == (1, 1, 300) and res.past_key_values.get_seq_length() == 6
    cache = res.past_key_values
    cache.batch_repeat_interleave(3)
    pos = torch.arange(6, 10).expand(3, 4)
    got = model(tails, attention_mask=torch.ones(3, 10, dtype=torch.long), past_key_values=cache, position_ids=pos,
                use_cache=True).logits
    full = model(torch.cat([prefix.expand(3, 6), tails], dim=1)).logits
    torch.testing.assert_close(got, full[:, 6:], rtol=0, atol=1e-4)
    torch.testing.assert_close(res.logits[0, -1], full[0, 5], rtol=0, atol=1e-4)


def test_left_padded_batch_generates_like_single_prompts(env):
    model = load_fused(env["out"], env["ks"])
    a = torch.tensor([[5, 9, 17, 33, 60]])
    b = torch.tensor([[7, 8, 90]])
    batch = torch.tensor([[5, 9, 17, 33, 60], [0, 0, 7, 8, 90]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    out = model.generate(batch, mask, max_new_tokens=5, eos_token_id=-1)
    assert torch.equal(out[0, 5:], model.generate(a, max_new_tokens=5, eos_token_id=-1)[0, 5:])
    assert torch.equal(out[1, 5:], model.generate(b, max_new_tokens=5, eos_token_id=-1)[0, 3:])


# --------------------------------------------------------------------------- Hugging Face generate arguments
def test_generate_takes_hugging_face_arguments_greedy_and_sampled(env):
    model = load_fused(env["out"], env["ks"])
    ids = torch.tensor([[5, 9, 17, 33, 60]])
    greedy = model.generate(ids, max_new_tokens=6, eos_token_id=-1)
    # do_sample=False was a TypeError; with the sampling knobs it is greedy (transformers ignores them too)
    assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=-1, do_sample=False, temperature=0.0,
                                      top_p=0.5, num_beams=1, num_return_sequences=1), greedy)
    assert torch.equal(model.generate(ids, max_length=11, eos_token_id=-1), greedy)  # prompt 5 + 6 new
    # top_k=1 keeps only the argmax: sampling gives the greedy tokens whatever the seed
    g = torch.Generator().manual_seed(3)
    assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=-1, do_sample=True, top_k=1, generator=g),
                       greedy)

    def sample(seed: int, **kw) -> torch.Tensor:
        return model.generate(ids, max_new_tokens=12, eos_token_id=-1, do_sample=True, temperature=5.0, top_k=0,
                              generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(1), sample(1))  # seeded: reproducible
    draws = {tuple(sample(s)[0, 5:].tolist()) for s in range(4)}
    assert len(draws) > 1 and tuple(greedy[0, 5:].tolist()) not in draws  # hot sampling is not greedy
    # a tiny nucleus keeps only the most likely token: greedy again
    assert torch.equal(sample(2, top_p=1e-6)[:, :11], greedy)


def test_generate_min_new_tokens_and_eos_lists(env):
    model = load_fused(env["out"], env["ks"])
    ids = torch.tensor([[5, 9, 17, 33, 60]])
    first = int(model.generate(ids, max_new_tokens=1, eos_token_id=-1)[0, 5])
    stopped = model.generate(ids, max_new_tokens=6, eos_token_id=[999, first])
    assert stopped.shape[1] == 6  # the first new token is an EOS of the list
    longer = model.generate(ids, max_new_tokens=6, eos_token_id=[first], min_new_tokens=3)
    assert longer.shape[1] >= 8 and first not in longer[0, 5:7].tolist()


@pytest.mark.parametrize("kw, name", [
    ({"num_beams": 4}, "num_beams"), ({"repetition_penalty": 1.3}, "repetition_penalty"),
    ({"foo": 1}, "'foo'"), ({"generation_config": object()}, "generation_config"),
    ({"do_sample": True, "temperature": 0.0}, "temperature"), ({"do_sample": True, "top_p": 1.5}, "top_p"),
    ({"do_sample": "yes"}, "do_sample"), ({"max_new_tokens": -1}, "max_new_tokens"),
])
def test_generate_refuses_each_unsupported_argument_by_name(env, kw, name):
    model = load_fused(env["out"], env["ks"])
    with pytest.raises(ModelError, match=name):
        model.generate(torch.tensor([[5, 9, 17]]), **{"max_new_tokens": 2, **kw})
