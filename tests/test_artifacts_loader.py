"""The verified loader: a real tiny Llama loads only through a verified bundle, from a private copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from artifacts_helpers import BASE_HASH, NOW, flip_byte

from fedproxy_secure.artifacts import create_keyset, generate_key, issue_bundle, load_verified_proxy
from fedproxy_secure.errors import SecurityError


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
    )
    d = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    (d / "fedproxy.json").write_text(json.dumps({"base_model_hash": BASE_HASH}))
    for junk in d.iterdir():  # generation_config.json is fine (json); keep only allowed types
        assert junk.suffix in {".json", ".safetensors"}, junk
    return d


def test_load_verified_tiny_llama(tiny_llama: Path, tmp_path: Path) -> None:
    key = generate_key()
    ks = create_keyset(key, name="dep", now=NOW)
    b = tmp_path / "bundle"
    issue_bundle(tiny_llama, key, version=1, valid_days=30, out_dir=b, now=NOW)
    loaded = load_verified_proxy(b, ks, tmp_path / "state", now=NOW)
    model, tok = loaded
    assert tok is None
    assert loaded.bundle.version == 1 and loaded.bundle.is_private_copy
    assert not loaded.bundle.root.exists()  # private copy removed after loading
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(tiny_llama, use_safetensors=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_tampered_bundle_is_never_parsed(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    calls = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(a))
    key = generate_key()
    ks = create_keyset(key, name="dep", now=NOW)
    b = tmp_path / "bundle"
    issue_bundle(tiny_llama, key, version=1, valid_days=30, out_dir=b, now=NOW)
    flip_byte(b / "model.safetensors", offset=-3)
    with pytest.raises(SecurityError, match="SHA-256 mismatch"):
        load_verified_proxy(b, ks, tmp_path / "state", now=NOW)
    assert calls == []


def test_loader_parses_the_verified_copy_not_the_folder(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TOCTOU: after verification the loader reads its private copy, so a swap in the bundle folder is not seen."""
    import transformers

    key = generate_key()
    ks = create_keyset(key, name="dep", now=NOW)
    b = tmp_path / "bundle"
    issue_bundle(tiny_llama, key, version=1, valid_days=30, out_dir=b, now=NOW)
    seen = {}

    def fake_from_pretrained(path, **kw):
        seen["path"], seen["kw"] = path, kw
        flip_byte(b / "model.safetensors", offset=-3)  # attacker swaps bytes right after verification
        seen["copy_differs_from_swapped_folder"] = (Path(path) / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
        return "model"

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    model, tok = load_verified_proxy(b, ks, tmp_path / "state", now=NOW)
    assert model == "model" and Path(seen["path"]) != b and seen["copy_differs_from_swapped_folder"]
    assert seen["kw"]["use_safetensors"] is True and seen["kw"]["trust_remote_code"] is False
