"""``client train``: signed bundle required, config errors name the field, DP budget across runs."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedproxy_secure.cli.main import _load_commands
from fedproxy_secure.cli.app import app
from fedproxy_secure.artifacts import create_keyset, generate_key, issue_bundle, save_keyset
from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.models.tiny import save_tiny_llm

_load_commands()
runner = CliRunner()

CFG = """client:
  round_id: {rid}
  a_seed: 3
  planned_rounds: 2
  max_length: 64
  lora: {{r: 2, alpha: 4}}
  train: {{lr: 0.01, local_steps: 2, batch_size: 2, update_clip_norm: 0.5}}
  dp: {{enabled: {dp}, epsilon: 4.0, delta: 1.0e-5}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = save_tiny_llm(TinyModelSpec(layers=2, hidden=32, heads=2, intermediate=64, vocab=300, max_positions=128),
                          tmp / "proxy")
    (model / "fedproxy.json").write_text(json.dumps({"base_model_hash": "sha256:" + "ab" * 32, "lora_targets": []}))
    key = generate_key()
    ks = tmp / "keyset.json"
    save_keyset(create_keyset(key, name="t"), ks)
    issue_bundle(model, key, version=1, valid_days=30, out_dir=tmp / "bundle")
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: 2+{i}=", "response": f" {2 + i}"}) + "\n" for i in range(6)))
    return tmp, ks, data


def _cfg(tmp, rid=0, dp="false"):
    p = tmp / f"cfg-{rid}-{dp}.yaml"
    p.write_text(CFG.format(rid=rid, dp=dp))
    return p


def test_signed_bundle_round(setup) -> None:
    tmp, ks, data = setup
    out = tmp / "out" / "update.safetensors"
    r = runner.invoke(app, ["client", "train", "--bundle", str(tmp / "bundle"), "--data", str(data), "--config",
                            str(_cfg(tmp)), "--out", str(out), "--keyset", str(ks), "--state-dir", str(tmp / "st")])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.with_suffix(".json").read_text())
    delta = load_file(str(out))["delta"]
    assert delta.dtype.is_floating_point and delta.numel() == sum(a * b for a, b in rep["lora_shapes"])
    assert float(delta.norm()) <= 0.5 + 1e-9 and rep["steps"] == 2 and "epsilon" not in rep
    assert all(".lora_B." in n for n in rep["lora_names"])


def test_keyset_required_and_config_errors(setup) -> None:
    tmp, ks, data = setup
    base = ["client", "train", "--bundle", str(tmp / "bundle"), "--data", str(data), "--out", str(tmp / "u.safetensors")]
    r = runner.invoke(app, base + ["--config", str(_cfg(tmp))])
    assert r.exit_code == 2 and "--keyset" in r.output
    bad = tmp / "bad.yaml"
    bad.write_text("client:\n  train: {lr: -1}\n  lorra: {}\n")
    r = runner.invoke(app, base + ["--config", str(bad), "--keyset", str(ks)])
    assert r.exit_code == 2 and "client.train.lr" in r.output and "lorra" in r.output
    empty = tmp / "empty.jsonl"
    empty.write_text("\n")
    r = runner.invoke(app, base[:5] + [str(empty)] + base[6:] + ["--config", str(_cfg(tmp)), "--keyset", str(ks)])
    assert r.exit_code == 1 and "no records" in r.output


def test_unsigned_dev_dp_budget_across_runs(setup) -> None:
    tmp, _, data = setup
    st = tmp / "dpstate"
    eps = []
    for rid in range(3):
        out = tmp / f"dp{rid}.safetensors"
        r = runner.invoke(app, ["client", "train", "--bundle", str(tmp / "proxy"), "--data", str(data), "--config",
                                str(_cfg(tmp, rid, "true")), "--out", str(out), "--unsigned-dev", "--state-dir", str(st)])
        if rid < 2:
            assert r.exit_code == 0, r.output
            rep = json.loads(out.with_suffix(".json").read_text())
            assert rep["accountant"] == "prv"
            eps.append(rep["epsilon"])
        else:
            assert r.exit_code == 1 and "privacy budget exhausted" in r.output
            assert not out.exists()
    assert eps[0] < eps[1] <= 4.0
