"""Hardening of three commands (issue 17), each a one-line error and a quick exit that writes nothing:
``server compress`` on a model folder without a tokenizer, ``server status`` on a folder with no
federation, and ``bench secagg`` with too few clients."""

from __future__ import annotations

import shutil
import time

import pytest
from typer.testing import CliRunner

from fedproxy_secure.cli.app import app
from fedproxy_secure.cli.main import _load_commands
from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.models.tiny import save_tiny_llm

_load_commands()
runner = CliRunner()


def _one_line(output: str) -> str:
    """The output with rich's box borders and line wrapping removed."""
    return " ".join(output.replace("│", " ").split())


@pytest.fixture(scope="module")
def llm_without_tokenizer(tmp_path_factory):
    full = save_tiny_llm(TinyModelSpec(arch="llama", layers=4), tmp_path_factory.mktemp("m") / "llm")
    bare = full.parent / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(full / f, bare / f)
    return full, bare


@pytest.fixture()
def calib(tmp_path):
    d = tmp_path / "calib"
    d.mkdir()
    (d / "a.txt").write_text("\n".join(f"calibration sentence {i} about foxes and dogs" for i in range(8)))
    return d


def test_compress_without_tokenizer_is_refused_before_any_work(llm_without_tokenizer, calib, tmp_path):
    _, bare = llm_without_tokenizer
    t0 = time.perf_counter()
    r = runner.invoke(app, ["server", "compress", "--llm", str(bare), "--calib", str(calib),
                            "--out", str(tmp_path / "proxy"), "--quiet"])
    elapsed = time.perf_counter() - t0
    out = _one_line(r.output)
    assert r.exit_code == 1, r.output
    assert f"--llm: model folder {str(bare)!r} has no tokenizer" in out and "tokenizer.json" in out, out
    assert "Traceback" not in r.output and not (tmp_path / "proxy").exists()
    assert elapsed < 10, elapsed  # no model load, no Block Influence pass


def test_compress_with_a_broken_tokenizer_file_is_one_line(llm_without_tokenizer, calib, tmp_path):
    _, bare = llm_without_tokenizer
    broken = tmp_path / "broken"
    shutil.copytree(bare, broken)
    (broken / "tokenizer.json").write_text("{not json")
    r = runner.invoke(app, ["server", "compress", "--llm", str(broken), "--calib", str(calib),
                            "--out", str(tmp_path / "proxy"), "--quiet"])
    out = _one_line(r.output)
    assert r.exit_code == 1 and f"--llm: the tokenizer in {str(broken)!r} cannot be loaded" in out, r.output
    assert not (tmp_path / "proxy").exists()


def test_compress_with_the_tokenizer_still_passes_the_check(llm_without_tokenizer):
    from fedproxy_secure.compress.tokenizer_check import check_llm_folder, load_llm_tokenizer

    full, _ = llm_without_tokenizer
    check_llm_folder(full)
    assert load_llm_tokenizer(full)("abc")["input_ids"]


@pytest.mark.parametrize("make", [False, True], ids=["missing", "empty"])
def test_status_of_a_folder_without_federation_creates_nothing(tmp_path, make):
    d = tmp_path / "nodir"
    if make:
        d.mkdir()
    r = runner.invoke(app, ["server", "status", "--dir", str(d)])
    assert r.exit_code == 2, r.output
    out = _one_line(r.output)
    assert f"--dir: no federation in {str(d)!r}" in out and f"server init --dir {d}" in out, out
    assert (list(d.iterdir()) == []) if make else not d.exists()


def test_bench_secagg_one_client_is_a_usage_error(tmp_path):
    t0 = time.perf_counter()
    r = runner.invoke(app, ["bench", "secagg", "--clients", "1", "--params", "10", "--repeats", "1"])
    assert r.exit_code == 2 and time.perf_counter() - t0 < 5
    out = _one_line(r.output)
    assert "'--clients'" in out and "greater than or equal to 2" in out, out


def test_bench_secagg_dropout_leaving_too_few_survivors_is_a_usage_error(tmp_path):
    r = runner.invoke(app, ["bench", "secagg", "--clients", "2", "--params", "10", "--repeats", "1",
                            "--json", str(tmp_path / "b.json")])
    out = _one_line(r.output)
    assert r.exit_code == 2 and "'--dropout'" in out and "1 survivors is below threshold 2" in out, out
    assert not (tmp_path / "b.json").exists()
    ok = runner.invoke(app, ["bench", "secagg", "--clients", "2", "--dropout", "0", "--params", "10",
                             "--repeats", "1"])
    assert ok.exit_code == 0, ok.output
