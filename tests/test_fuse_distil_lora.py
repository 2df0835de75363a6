"""distil-lora: the logit plug-in distilled into a LoRA on the LLM on server text, served as a dense folder."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import fedproxy_secure.cli.fuse  # noqa: F401  (registers the command)
from fedproxy_secure.artifacts import create_keyset, generate_key, save_private_key
from fedproxy_secure.cli.app import app
from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.errors import ConfigError, DataError
from fedproxy_secure.fuse import load_fused_model
from fedproxy_secure.fuse.distil_lora import block_linear_names, mean_token_kl, split_server_texts
from fedproxy_secure.fuse.package import build_logit_model
from fedproxy_secure.models import load_causal_lm, set_decoder_blocks
from fedproxy_secure.models.tiny import save_tiny_llm

SPEC = TinyModelSpec(layers=4, hidden=32, heads=4, intermediate=64, vocab=300, seed=9)
KEEP = [0, 3]
SERVER = [f"Server note {i}: the {['red', 'blue', 'green'][i % 3]} train leaves at {i % 12} o'clock, platform {i % 4}."
          for i in range(40)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dl")
    llm_dir = save_tiny_llm(SPEC, tmp / "llm")
    proxy = copy.deepcopy(load_causal_lm(llm_dir))
    set_decoder_blocks(proxy, KEEP)
    proxy.save_pretrained(tmp / "proxy", safe_serialization=True)
    (tmp / "proxy" / "fedproxy.json").write_text(json.dumps({"layer_map": KEEP, "distilled": False}))
    torch.manual_seed(0)
    pm = get_peft_model(proxy, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp / "adapter", safe_serialization=True)
    key = generate_key()
    save_private_key(key, tmp / "server.key")
    (tmp / "server.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in SERVER))
    return tmp, create_keyset(key, name="op")


def test_split_and_targets():
    train, held = split_server_texts(SERVER, seed=1)
    assert len(held) == 8 and len(train) == 32 and not set(train) & set(held)
    with pytest.raises(DataError):
        split_server_texts(["only one"])
    from fedproxy_secure.models import build_tiny_model

    assert block_linear_names(build_tiny_model(SPEC)) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_cli_distil_lora_moves_the_llm_toward_the_plugin_on_heldout_server_text(folders):
    tmp, ks = folders
    out = tmp / "dense"
    args = ["server", "fuse", "--llm", str(tmp / "llm"), "--proxy", str(tmp / "proxy"), "--lora", str(tmp / "adapter"),
            "--out", str(out), "--key", str(tmp / "server.key"), "--method", "distil-lora", "--threads", "1"]
    r = CliRunner().invoke(app, args)
    assert isinstance(r.exception, ConfigError) and "--server-text" in str(r.exception) and not out.exists()
    r = CliRunner().invoke(app, args + ["--server-text", str(tmp / "server.jsonl"), "--distil-steps", "30",
                                        "--distil-lr", "0.01", "--distil-rank", "4", "--max-length", "32"])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "fused.json").read_text())
    assert rec["method"] == "distil-lora" and rec["teacher"]["layer_map"] == KEEP
    assert "Server note" not in (out / "fused.json").read_text()  # a hash of the server text, not the text
    d = rec["distil"]
    assert d["heldout_kl_llm"] > 1e-3  # the plug-in really differs from the LLM
    assert d["heldout_kl_student"] < 0.5 * d["heldout_kl_llm"], d
    # recompute independently from the signed folder: the served dense model is closer to the plug-in than the LLM
    student = load_fused_model(out, ks)
    assert student.fused_meta["method"] == "distil-lora"
    teacher = build_logit_model(tmp / "llm", tmp / "proxy", tmp / "adapter").model
    _, held = split_server_texts(SERVER, seed=0)
    kl_llm = mean_token_kl(teacher, teacher.llm, student.tokenizer, held, max_length=32)
    kl_student = mean_token_kl(teacher, student, student.tokenizer, held, max_length=32)
    assert kl_llm == pytest.approx(d["heldout_kl_llm"], rel=1e-4)
    assert kl_student == pytest.approx(d["heldout_kl_student"], rel=1e-3)
    assert kl_student < 0.5 * kl_llm
    # the dense student has exactly the LLM's architecture and size (no proxy at serving time)
    llm = load_causal_lm(tmp / "llm")
    assert student.state_dict().keys() == llm.state_dict().keys()
