"""The networked client's real-trainer pieces: bundle fetch (signature before parsing, size caps),
client.yaml validation, what a report may carry, and the DP policy check. No server process."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from fedproxy_secure.artifacts import create_keyset, generate_key, issue_bundle, save_keyset, verify_bundle
from fedproxy_secure.client.join import public_report
from fedproxy_secure.client.join_config import load_join_config
from fedproxy_secure.client.net_lora import check_dp_policy, fetch_bundle
from fedproxy_secure.config import DPConfig
from fedproxy_secure.errors import ConfigError, SecurityError
from tests.artifacts_helpers import make_proxy


def _session(bundle: Path, requested: list, tamper=None):
    def handler(req: httpx.Request) -> httpx.Response:
        from fedproxy_secure.transport.signing import H_CLIENT, H_SIG
        assert req.headers.get(H_SIG) and req.headers.get(H_CLIENT) == "c-test"  # signed request
        name = req.url.path.removeprefix("/v1/bundle/")
        requested.append(name)
        p = bundle / name
        if not p.is_file():
            return httpx.Response(404, json={"error": "no such file"})
        data = p.read_bytes()
        return httpx.Response(200, content=tamper(name, data) if tamper else data)

    http = SimpleNamespace(base="https://127.0.0.1:1", http=httpx.Client(transport=httpx.MockTransport(handler)))
    return SimpleNamespace(key=generate_key(), client_id="c-test", http=http)


@pytest.fixture()
def signed(tmp_path):
    key = generate_key()
    ks = create_keyset(key, name="demo")
    bundle = tmp_path / "bundle"
    issue_bundle(make_proxy(tmp_path / "proxy"), key, version=1, valid_days=30, out_dir=bundle)
    return key, ks, bundle


def test_fetch_bundle_gets_exactly_the_signed_files_and_verifies(signed, tmp_path):
    _, ks, bundle = signed
    (bundle / "extra.json").write_text("{}")  # served by a sloppy server but not in the manifest
    req: list = []
    got = fetch_bundle(_session(bundle, req), ks, tmp_path / "dl")
    man = json.loads((bundle / "MANIFEST.json").read_bytes())
    assert req[:2] == ["MANIFEST.sig", "MANIFEST.json"]
    assert sorted(req[2:]) == sorted(f["path"] for f in man["files"])
    assert not (got / "extra.json").exists()
    vb = verify_bundle(got, ks)
    assert vb.version == 1


def test_fetch_bundle_refuses_a_bundle_not_signed_by_the_pinned_key(signed, tmp_path):
    _, _, bundle = signed
    other = create_keyset(generate_key(), name="demo")
    req: list = []
    with pytest.raises(SecurityError, match="pinned keyset"):
        fetch_bundle(_session(bundle, req), other, tmp_path / "dl")
    assert req == ["MANIFEST.sig", "MANIFEST.json"]  # no model file fetched, manifest never parsed


def test_fetch_bundle_caps_each_file_at_its_signed_size(signed, tmp_path):
    _, ks, bundle = signed
    grow = lambda name, data: data + b"\0" * 10 if name.endswith(".safetensors") else data  # noqa: E731
    with pytest.raises(SecurityError, match="larger than"):
        fetch_bundle(_session(bundle, [], tamper=grow), ks, tmp_path / "dl")


def test_fetched_bundle_with_a_changed_byte_fails_full_verification(signed, tmp_path):
    _, ks, bundle = signed
    flip = lambda name, data: data[:-1] + bytes([data[-1] ^ 1]) if name == "model.safetensors" else data  # noqa: E731
    got = fetch_bundle(_session(bundle, [], tamper=flip), ks, tmp_path / "dl")
    with pytest.raises(SecurityError):
        verify_bundle(got, ks)


def _enrol(tmp: Path) -> Path:
    e = tmp / "enrol"
    e.mkdir()
    (e / "server.json").write_text(json.dumps({"url": "https://127.0.0.1:1"}))
    return e


def test_client_yaml_lora_needs_data_and_pinned_keyset(tmp_path):
    _enrol(tmp_path)
    y = tmp_path / "client.yaml"
    y.write_text("enrolment: enrol\ntrainer: lora\ndata: train.jsonl\n")
    with pytest.raises(ConfigError, match="keyset"):
        load_join_config(y)
    y.write_text("enrolment: enrol\ntrainer: lora\nkeyset: ks.json\n")
    with pytest.raises(ConfigError, match="data"):
        load_join_config(y)
    y.write_text("enrolment: enrol\ntrainer: lora\ndata: train.jsonl\nkeyset: ks.json\n"
                 "dp: {enabled: true, epsilon: 4.0, delta: 1.0e-6}\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_join_config(y)
    (tmp_path / "train.jsonl").write_text('{"prompt": "q", "response": "a"}\n')
    save_keyset(create_keyset(generate_key()), tmp_path / "ks.json")
    y.write_text("enrolment: enrol\ntrainer: lora\ndata: train.jsonl\nkeyset: ks.json\n"
                 "dp: {enabled: true, epsilon: 4.0, delta: 1.0e-6}\n")
    cfg = load_join_config(y)
    assert cfg.data == tmp_path / "train.jsonl" and cfg.keyset == tmp_path / "ks.json"
    assert cfg.state_dir.is_absolute() and cfg.dp.enabled and cfg.dp.epsilon == 4.0 and cfg.threads == 1
    y.write_text("enrolment: enrol\ntrainer: synthetic\ndp: {epsilon: -1}\n")
    with pytest.raises(ConfigError, match="dp.epsilon"):
        load_join_config(y)
    y.write_text("enrolment: enrol\ntrainer: synthetic\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_join_config(y)
    y.write_text("enrolment: enrol\ntrainer: lora\ndata: train.jsonl\nkeyset: ks.json\n")  # DP off
    with pytest.raises(ConfigError, match="policy.require_dp"):
        load_join_config(y)
    y.write_text("enrolment: enrol\ntrainer: lora\ndata: train.jsonl\nkeyset: ks.json\n"
                 "policy: {require_dp: false}\n")  # a test federation opts out explicitly
    assert not load_join_config(y).dp.enabled


def test_report_carries_only_round_accounting_and_no_nan():
    rep = public_report({"epsilon": np.float64(3.5), "delta": 1e-5, "accountant": "prv", "train_loss": float("nan"),
                         "num_examples": 96, "examples": ["secret prompt"], "lora_names": ["a"],
                         "pre_clip_norm": np.float64(0.4), "dp": True}, 4)
    assert rep == {"round_id": 4, "epsilon": 3.5, "delta": 1e-5, "accountant": "prv", "status": "trained"}
    json.dumps(rep, allow_nan=False)
    assert public_report({"epsilon": float("nan")}, 1) == {"round_id": 1, "status": "trained"}


def test_client_refuses_a_federation_stricter_than_its_dp():
    policy = {"enabled": True, "epsilon": 8.0, "delta": 1e-5}
    check_dp_policy(DPConfig(enabled=True, epsilon=8.0, delta=1e-5), policy)
    check_dp_policy(DPConfig(enabled=True, epsilon=2.0, delta=1e-6), policy)
    check_dp_policy(DPConfig(enabled=False), {"enabled": False})
    with pytest.raises(ConfigError, match="requires DP"):
        check_dp_policy(DPConfig(enabled=False), policy)
    with pytest.raises(ConfigError, match="epsilon"):
        check_dp_policy(DPConfig(enabled=True, epsilon=9.0, delta=1e-5), policy)
    with pytest.raises(ConfigError, match="delta"):
        check_dp_policy(DPConfig(enabled=True, epsilon=8.0, delta=1e-4), policy)
