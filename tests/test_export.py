"""`server export`: the global LoRA of a finished round as a PEFT adapter that
AutoPeftModelForCausalLM loads from its folder alone (base_model_name_or_path = the proxy beside it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fedproxy_secure.cli.fuse  # noqa: F401  (registers the commands)
import fedproxy_secure.cli.server_net  # noqa: F401
import fedproxy_secure.cli.signing  # noqa: F401
from fedproxy_secure.cli.app import app
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.server.fed_config import FederationFile
from fedproxy_secure.server.rounds import state_to_bytes
from fedproxy_secure.server.setup import init_from_bundle, load_settings
from fedproxy_secure.server.store import SQLiteStore
from tests.fed_bundle_helpers import tiny_bundle


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A federation from a tiny bundle whose round 1 finished with a random global LoRA vector."""
    tmp = tmp_path_factory.mktemp("exportfed")
    bundle, ks = tiny_bundle(tmp)
    d = tmp / "srv"
    init_from_bundle(d, FederationFile.model_validate({"rounds": 3, "lora": {"r": 4, "alpha": 8}}), bundle, ks)
    theta = np.random.default_rng(1).standard_normal(load_settings(d).dim) * 0.5
    st = SQLiteStore(d / "state.db")
    st.put_global_state(0, state_to_bytes(np.zeros_like(theta)))
    st.open_round(1, "11" * 32, "join", 0.0, {})
    st.close_round(1, "done", "ok", {"survivors": []}, state_to_bytes(theta))
    st.open_round(2, "22" * 32, "join", 0.0, {})
    st.close_round(2, "aborted", "test", None, None)
    st.close()
    return d, theta


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_loads_with_auto_peft_and_carries_the_global_state(finished, tmp_path):
    from peft import AutoPeftModelForCausalLM

    from fedproxy_secure.config import LoraConfig
    from fedproxy_secure.lora import attach_lora, set_lora_vector
    from fedproxy_secure.models.loading import load_causal_lm

    d, theta = finished
    out = tmp_path / "export"
    r = CliRunner().invoke(app, ["server", "export", "--dir", str(d), "--round", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str((out / "proxy").resolve())
    rec = json.loads((out / "export.json").read_text())
    assert rec["round"] == 1 and rec["lora_dim"] == theta.size and rec["a_seed"] == load_settings(d).a_seed
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter")).eval()  # from the folder alone
    s = load_settings(d)
    ref = attach_lora(load_causal_lm(out / "proxy"), LoraConfig.model_validate(s.train["lora"]), s.a_seed)
    set_lora_vector(ref, theta)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    base = _logits(load_causal_lm(out / "proxy"), ids)
    got = _logits(loaded, ids)
    assert torch.allclose(got, _logits(ref.eval(), ids), atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-4)  # the adapter changes the proxy


def test_export_refuses_an_unfinished_round_and_a_used_folder(finished, tmp_path):
    d, _ = finished
    r = CliRunner().invoke(app, ["server", "export", "--dir", str(d), "--round", "2", "--out", str(tmp_path / "x")])
    assert isinstance(r.exception, ConfigError) and "--round 2" in str(r.exception) and "[1]" in str(r.exception)
    used = tmp_path / "used"
    used.mkdir()
    (used / "f").write_text("x")
    r = CliRunner().invoke(app, ["server", "export", "--dir", str(d), "--out", str(used)])
    assert isinstance(r.exception, ConfigError) and "--out" in str(r.exception)


def test_fuse_takes_the_federation_directory_and_equals_export_then_fuse(finished, tmp_path):
    """`server fuse --federation DIR --round N` writes the same dense model as `server export` + `server fuse --proxy --lora`."""
    from safetensors.torch import load_file

    d, _ = finished
    llm = d.parent / "proxy"  # the tiny bundle's proxy keeps every block (layer map [0, 1]): it stands in for the LLM
    run = CliRunner().invoke
    assert run(app, ["server", "keygen", "--out", str(tmp_path / "keys")]).exit_code == 0
    key = str(tmp_path / "keys" / "server.key")
    direct = run(app, ["server", "fuse", "--llm", str(llm), "--federation", str(d), "--round", "1", "--method", "weight",
                       "--key", key, "--out", str(tmp_path / "direct")])
    assert direct.exit_code == 0, direct.output
    assert "round 1" in direct.output
    assert run(app, ["server", "export", "--dir", str(d), "--round", "1", "--out", str(tmp_path / "exp")]).exit_code == 0
    via = run(app, ["server", "fuse", "--llm", str(llm), "--proxy", str(tmp_path / "exp" / "proxy"), "--lora",
                    str(tmp_path / "exp" / "adapter"), "--method", "weight", "--round", "1", "--key", key,
                    "--out", str(tmp_path / "via")])
    assert via.exit_code == 0, via.output
    a, b = load_file(tmp_path / "direct" / "model.safetensors"), load_file(tmp_path / "via" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], load_file(llm / "model.safetensors")[k]) for k in a)  # the LoRA was fused in
    both = run(app, ["server", "fuse", "--llm", str(llm), "--federation", str(d), "--proxy", str(llm), "--key", key,
                     "--out", str(tmp_path / "x")])
    assert isinstance(both.exception, ConfigError) and "--federation" in str(both.exception)  # the CLI maps it to exit 2
