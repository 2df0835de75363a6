"""`server fuse` end to end on tiny folders; logit and Offsite-Tuning plug-ins; LLM path stays server-side."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fedproxy_secure.cli.fuse  # noqa: F401  (registers the command)
from fedproxy_secure.cli.app import app
from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.errors import ModelError
from fedproxy_secure.fuse import deltas_from_peft_model, logit_plugin_fn
from fedproxy_secure.fuse.offsite import emulator_layer_map, plug_offsite_blocks, plug_offsite_deltas
from fedproxy_secure.models import build_tiny_model, load_causal_lm, set_decoder_blocks
from fedproxy_secure.models.tiny import save_tiny_llm

ROOT = Path(__file__).resolve().parents[1]
SPEC = TinyModelSpec(layers=6, hidden=32, heads=4, intermediate=64, vocab=300, seed=3)
KEEP = [0, 1, 4, 5]


def _peft(model, seed=0, layers=None):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, layers_to_transform=layers,
                                                         target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return pm


@pytest.fixture()
def keyfiles(tmp_path):
    from fedproxy_secure.artifacts import create_keyset, generate_key, save_private_key

    key = generate_key()
    save_private_key(key, tmp_path / "server.key")
    return tmp_path / "server.key", create_keyset(key, name="op")


@pytest.fixture()
def folders(tmp_path):
    llm_dir = save_tiny_llm(SPEC, tmp_path / "llm")
    llm = load_causal_lm(llm_dir)
    proxy = copy.deepcopy(llm)
    set_decoder_blocks(proxy, KEEP)
    pdir = tmp_path / "proxy"
    proxy.save_pretrained(pdir, safe_serialization=True)
    (pdir / "fedproxy.json").write_text(json.dumps({"layer_map": KEEP, "fusion_mode": "overwrite", "distilled": False}))
    pm = _peft(proxy)
    pm.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    return llm_dir, pdir, tmp_path / "adapter", pm


def test_server_fuse_writes_dense_folder_and_record(folders, keyfiles, tmp_path):
    from fedproxy_secure.errors import ConfigError
    from fedproxy_secure.fuse import load_fused_model

    llm_dir, pdir, adir, pm = folders
    out = tmp_path / "fused"
    r = CliRunner().invoke(app, ["server", "fuse", "--llm", str(llm_dir), "--proxy", str(pdir), "--lora", str(adir),
                                 "--out", str(out), "--round", "7", "--aggregator", "hties", "--method", "weight",
                                 "--key", str(keyfiles[0]), "--threads", "1"])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "fusion.json").read_text())
    assert rec["layer_map"] == KEEP and rec["source_round"] == 7 and rec["aggregator"] == "hties"
    assert len(rec["inputs"]["adapter_sha256"]) == 64 and len(rec["fused_weights_sha256"]) == 64
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    fused = load_causal_lm(out)
    merged = pm.merge_and_unload().state_dict()
    for j, l in enumerate(KEEP):
        torch.testing.assert_close(fused.state_dict()[f"model.layers.{l}.mlp.down_proj.weight"],
                                   merged[f"model.layers.{j}.mlp.down_proj.weight"], rtol=0, atol=2e-7)
    assert load_fused_model(out, keyfiles[1]).fused_meta["method"] == "weight"  # signed, loads through the entry point
    # a second run into the same folder is refused (no overwrite)
    r2 = CliRunner().invoke(app, ["server", "fuse", "--llm", str(llm_dir), "--proxy", str(pdir), "--lora", str(adir),
                                  "--out", str(out), "--method", "weight", "--key", str(keyfiles[0]), "--threads", "1"])
    assert r2.exit_code != 0 and isinstance(r2.exception, ConfigError) and "not an empty folder" in str(r2.exception)


def test_server_fuse_refuses_proxy_of_a_bigger_llm(folders, keyfiles, tmp_path):
    llm_dir, pdir, adir, _ = folders
    (pdir / "fedproxy.json").write_text(json.dumps({"layer_map": [0, 1, 4, 9]}))
    for method in ("weight", "logit"):
        r = CliRunner().invoke(app, ["server", "fuse", "--llm", str(llm_dir), "--proxy", str(pdir), "--lora", str(adir),
                                     "--out", str(tmp_path / "f"), "--method", method, "--key", str(keyfiles[0]), "--threads", "1"])
        assert isinstance(r.exception, ModelError), (method, r.output)
        assert not (tmp_path / "f").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".f.tmp")]  # no half-written folder left


def test_server_fuse_default_logit_writes_a_folder_load_fused_accepts(folders, keyfiles, tmp_path):
    from fedproxy_secure.fuse import load_fused

    llm_dir, pdir, adir, pm = folders
    out = tmp_path / "served"
    r = CliRunner().invoke(app, ["server", "fuse", "--llm", str(llm_dir), "--proxy", str(pdir), "--lora", str(adir),
                                 "--out", str(out), "--beta", "0.5", "--key", str(keyfiles[0]), "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "logit" in r.output and "shares the LLM's blocks" in r.output
    model = load_fused(out, keyfiles[1])
    assert model.beta == 0.5 and model.fused_meta["layer_map"] == KEEP
    llm = load_causal_lm(llm_dir)
    ids = torch.randint(3, 300, (2, 7))
    with pm.disable_adapter():
        zb = pm(input_ids=ids).logits
    want = llm(input_ids=ids).logits + 0.5 * (pm(input_ids=ids).logits - zb)
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)


def test_server_fuse_usage_errors_are_config_errors(folders, keyfiles, tmp_path):
    """Missing --key, an unknown --method and delta on an undistilled proxy: ConfigError (CLI exit 2), nothing written."""
    from fedproxy_secure.errors import ConfigError

    llm_dir, pdir, adir, _ = folders
    common = ["server", "fuse", "--llm", str(llm_dir), "--proxy", str(pdir), "--lora", str(adir), "--out", str(tmp_path / "o")]
    cases = [(common, "--key"), (common + ["--key", str(keyfiles[0]), "--method", "dense"], "--method"),
             (common + ["--key", str(keyfiles[0]), "--method", "delta"], "distil")]
    for args, needle in cases:
        r = CliRunner().invoke(app, args)
        assert isinstance(r.exception, ConfigError) and needle in str(r.exception), (args, r.output)
        assert not (tmp_path / "o").exists()


def test_server_fuse_help_names_the_default():
    r = CliRunner().invoke(app, ["server", "fuse", "--help"])
    assert r.exit_code == 0 and "logit (default" in r.output


def test_logit_plugin_is_llm_when_proxy_untuned_and_shifts_by_beta():
    llm = build_tiny_model(SPEC)
    proxy = copy.deepcopy(llm)
    set_decoder_blocks(proxy, KEEP)
    ids = torch.randint(3, 300, (2, 10))
    mask = torch.ones_like(ids)
    z = llm(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(logit_plugin_fn(llm, proxy, proxy, beta=1.0)(ids, mask), z)
    tuned = _peft(proxy)
    shift = tuned(input_ids=ids, attention_mask=mask).logits - proxy(input_ids=ids, attention_mask=mask).logits
    got = logit_plugin_fn(llm, tuned, proxy, beta=0.5)(ids, mask)
    torch.testing.assert_close(got, z + 0.5 * shift)
    other = build_tiny_model(TinyModelSpec(layers=2, hidden=32, heads=4, intermediate=64, vocab=400))
    with pytest.raises(ModelError, match="vocabulary"):
        logit_plugin_fn(llm, other, proxy)


def test_offsite_plugin_touches_adapter_blocks_only():
    llm = build_tiny_model(SPEC)
    lm = emulator_layer_map(6, 0.5, 1)
    assert lm[0] == 0 and lm[-1] == 5 and len(lm) == 3
    emu = copy.deepcopy(llm)
    set_decoder_blocks(emu, lm)
    pm = _peft(emu, layers=[0, len(lm) - 1])
    fused = plug_offsite_deltas(llm, lm, deltas_from_peft_model(pm), n_adapt=1)
    changed = {k.split(".")[2] for k, v in fused.state_dict().items() if not torch.equal(v, llm.state_dict()[k])}
    assert changed == {"0", "5"}
    with pytest.raises(ModelError, match="adapter"):
        plug_offsite_deltas(llm, lm, deltas_from_peft_model(_peft(emu, layers=[1])), n_adapt=1)
    full = plug_offsite_blocks(llm, pm.merge_and_unload(), lm, n_adapt=1)
    torch.testing.assert_close(full.state_dict()["model.layers.5.self_attn.q_proj.weight"],
                               fused.state_dict()["model.layers.5.self_attn.q_proj.weight"], rtol=0, atol=2e-7)


def test_client_package_cannot_reach_the_llm_path_or_fusion():
    """Nothing under fedproxy_secure/client imports fuse or reads model.llm / FusionConfig."""
    for f in (ROOT / "fedproxy_secure" / "client").glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = getattr(node, "module", None) or ""
                names = [a.name for a in node.names]
                assert "fuse" not in mod and not any("fuse" in n for n in names), f
            if isinstance(node, ast.Attribute) and node.attr == "llm":
                raise AssertionError(f"{f}: reads an attribute named 'llm' (line {node.lineno})")
