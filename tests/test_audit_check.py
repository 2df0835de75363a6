"""`audit check`: a safe deployment passes; each unsafe deployment fails with the control named."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import fedproxy_secure.cli.audit_check  # noqa: F401  (registers the command)
from fedproxy_secure.cli.app import app
from fedproxy_secure.audit.check import load_deployment, run_check
from fedproxy_secure.audit.controls import CONTROLS, Policy, evaluate
from fedproxy_secure.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "bigbench-mini"

SAFE_NETWORK = {
    "clients": 3,
    "federation": {"rounds": 3, "min_clients": 3, "threshold": 3, "mode": "masking", "dim": 64, "clip_norm": 1.0},
    "dp": {"enabled": True, "epsilon": 8.0, "delta": 1.0e-5},
    "transport": {"mtls": True, "tls_min_version": "1.3"},
}
SAFE_SIMULATE = {
    "model": {"tiny": {"arch": "llama", "layers": 4, "hidden": 32, "heads": 2, "intermediate": 64, "vocab": 259}},
    "data": {"dir": str(DATA), "tasks": ["navigate"]},
    "clients": {"count": 4},
    "secagg": {"mode": "masking", "threshold": 3},
    "dp": {"enabled": True, "epsilon": 4.0, "delta": 1.0e-5},
    "train": {"update_clip_norm": 1.0},
}


def _write(tmp_path: Path, cfg: dict, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _merge(base: dict, patch: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _statuses(rep) -> dict[str, str]:
    return {f.control: f.status for f in rep.findings}


@pytest.mark.parametrize("cfg", [SAFE_NETWORK, SAFE_SIMULATE], ids=["network", "simulate"])
def test_safe_configs_pass(tmp_path: Path, cfg: dict) -> None:
    rep = run_check(_write(tmp_path, cfg))
    st = _statuses(rep)
    assert "FAIL" not in st.values(), st
    assert rep.exit_code == 0
    assert set(st) == set(CONTROLS)
    assert st["secagg.mode"] == st["dp.enabled"] == st["dp.epsilon"] == st["update.clip"] == "PASS"


def test_demo_configs_in_examples_pass() -> None:
    """examples/demo*.yaml (the config `make demo` uses, once it exists) must pass `audit check`."""
    for cfg in sorted((ROOT / "examples").glob("demo*.yaml")):
        rep = run_check(cfg)
        assert rep.exit_code == 0, (cfg, [f for f in rep.findings if f.status == "FAIL"])


UNSAFE = [
    ("dp-off", SAFE_NETWORK, {"dp": {"enabled": False}}, "dp.enabled"),
    ("epsilon-50", SAFE_NETWORK, {"dp": {"epsilon": 50.0}}, "dp.epsilon"),
    ("no-mtls", SAFE_NETWORK, {"transport": {"mtls": False}}, "transport.mtls"),
    ("tls12", SAFE_NETWORK, {"transport": {"tls_min_version": "1.2"}}, "transport.mtls"),
    ("plaintext", SAFE_NETWORK, {"federation": {"mode": "plain"}}, "secagg.mode"),
    ("he-no-flooding", SAFE_SIMULATE, {"secagg": {"mode": "he", "he": {"flood": False}}}, "he.flooding"),
    ("dp-off-simulate", SAFE_SIMULATE, {"dp": {"enabled": False}}, "dp.enabled"),
]


@pytest.mark.parametrize("base,patch,control", [u[1:] for u in UNSAFE], ids=[u[0] for u in UNSAFE])
def test_unsafe_config_fails_with_control_named(tmp_path: Path, base: dict, patch: dict, control: str) -> None:
    path = _write(tmp_path, _merge(base, patch))
    rep = run_check(path)
    fails = [f.control for f in rep.findings if f.status == "FAIL"]
    assert fails == [control], fails
    assert rep.exit_code == 1
    r = CliRunner().invoke(app, ["audit", "check", "--config", str(path)])
    assert r.exit_code == 1, r.output
    assert control in r.output and "FAIL" in r.output
    r = CliRunner().invoke(app, ["audit", "check", "--config", str(path), "--format", "json"])
    assert r.exit_code == 1
    doc = json.loads(r.output)
    assert doc["result"] == "FAIL"
    assert [f["control"] for f in doc["findings"] if f["status"] == "FAIL"] == [control]


def test_sa_hties_with_two_clients_fails_threshold(tmp_path: Path) -> None:
    cfg = _merge(SAFE_SIMULATE, {"clients": {"count": 2}, "secagg": {"threshold": 2}, "aggregator": {"name": "sa_hties"}})
    rep = run_check(_write(tmp_path, cfg))
    f = next(f for f in rep.findings if f.control == "secagg.threshold")
    assert f.status == "FAIL" and "SA-H-TIES" in f.message and "T20" in f.threats
    # the same cohort with FedAvg is only a warning (each of 2 clients learns the other's update)
    rep = run_check(_write(tmp_path, _merge(cfg, {"aggregator": {"name": "fedavg"}}), "b.yaml"))
    assert _statuses(rep)["secagg.threshold"] == "WARN"


def test_network_threshold_is_raised_like_the_round_engine(tmp_path: Path) -> None:
    cfg = _merge(SAFE_NETWORK, {"clients": 9, "federation": {"min_clients": 5, "threshold": 2}})
    dep, _ = load_deployment(_write(tmp_path, cfg))
    assert dep.threshold == 2 and dep.effective_threshold == 5  # max(t, n//2+1, 2), RoundEngine._threshold
    assert _statuses(run_check(_write(tmp_path, cfg)))["secagg.threshold"] == "PASS"


def test_simulate_threshold_is_raised_by_the_same_rule(tmp_path: Path) -> None:
    """simulate, the round engine and the auditor share wire.threshold.effective_threshold: a
    masking config asking for t=3 of 10 runs (and is audited) with a strict majority, t=6."""
    from fedproxy_secure.wire.threshold import effective_threshold

    cfg = _merge(SAFE_SIMULATE, {"clients": {"count": 10}, "secagg": {"threshold": 3}})
    dep, _ = load_deployment(_write(tmp_path, cfg))
    assert dep.threshold == 3 and dep.effective_threshold == 6 == effective_threshold("masking", 10, 3)
    assert _statuses(run_check(_write(tmp_path, cfg, "b.yaml")))["secagg.threshold"] == "PASS"


def test_epsilon_policy_thresholds(tmp_path: Path) -> None:
    path = _write(tmp_path, _merge(SAFE_NETWORK, {"dp": {"epsilon": 9.0}}))
    assert _statuses(run_check(path))["dp.epsilon"] == "WARN"
    assert _statuses(run_check(path, policy=Policy(max_epsilon=5.0, warn_epsilon=4.0)))["dp.epsilon"] == "FAIL"
    r = CliRunner().invoke(app, ["audit", "check", "--config", str(path), "--max-epsilon", "5"])
    assert r.exit_code == 1 and "dp.epsilon" in r.output
    bad_delta = _write(tmp_path, _merge(SAFE_NETWORK, {"dp": {"delta": 1e-3}}), "d.yaml")
    assert _statuses(run_check(bad_delta))["dp.epsilon"] == "FAIL"


def test_dp_in_federation_train_is_read(tmp_path: Path) -> None:
    cfg = {k: v for k, v in SAFE_NETWORK.items() if k != "dp"}
    cfg = _merge(cfg, {"federation": {"train": {"dp": {"enabled": True, "epsilon": 8.0, "delta": 1e-5}}}})
    st = _statuses(run_check(_write(tmp_path, cfg)))
    assert st["dp.enabled"] == "PASS" and st["dp.epsilon"] == "PASS"
    no_dp = {k: v for k, v in SAFE_NETWORK.items() if k != "dp"}
    assert _statuses(run_check(_write(tmp_path, no_dp, "n.yaml")))["dp.enabled"] == "FAIL"  # DP not stated


def test_he_mode_warns_on_shared_key_and_passes_flooding_by_default(tmp_path: Path) -> None:
    rep = run_check(_write(tmp_path, _merge(SAFE_SIMULATE, {"secagg": {"mode": "he"}})))
    st = _statuses(rep)
    assert st["he.flooding"] == "PASS" and st["he.shared_key"] == "WARN" and rep.exit_code == 0


@pytest.mark.parametrize("cfg,needle", [
    ({"clients": 3}, "cannot tell the format"),
    ({"clients": 3, "federation": {"mode": "masking", "bogus": 1}}, "unknown keys"),
    ({"clients": 3, "federation": {"mode": "masking"}, "transport": {"mtls": "yes"}}, "transport.mtls"),
    ({**SAFE_SIMULATE, "secagg": {"mode": "masking", "treshold": 3}}, "treshold"),
], ids=["no-format", "unknown-federation-key", "mtls-not-bool", "typo-in-run-config"])
def test_invalid_config_is_a_config_error(tmp_path: Path, cfg: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        run_check(_write(tmp_path, cfg))
    r = CliRunner().invoke(app, ["audit", "check", "--config", str(_write(tmp_path, cfg, "c.yaml"))])
    assert isinstance(r.exception, ConfigError)  # cli/main.py turns it into one line and exit status 2


def _server_state(tmp_path: Path) -> Path:
    from fedproxy_secure.protocol.settings import FederationSettings
    from fedproxy_secure.server.setup import init_server

    d = tmp_path / "server"
    init_server(d, FederationSettings(rounds=1, min_clients=3, threshold=3, dim=8))
    return d


def test_server_state_keys_and_audit_log_pass(tmp_path: Path) -> None:
    d = _server_state(tmp_path)
    rep = run_check(_write(tmp_path, SAFE_NETWORK), server_state=d)
    st = _statuses(rep)
    assert st["keys.expiry"] == "PASS" and st["audit.chain"] == "PASS", rep.findings
    assert rep.exit_code == 0


def test_broken_audit_chain_fails(tmp_path: Path) -> None:
    d = _server_state(tmp_path)
    log = d / "audit.jsonl"
    lines = log.read_text().splitlines()
    lines[0] = lines[0].replace('"server_init"', '"server_inix"')
    log.write_text("\n".join(lines) + "\n")
    cfg = _write(tmp_path, SAFE_NETWORK)
    rep = run_check(cfg, server_state=d)
    f = next(f for f in rep.findings if f.control == "audit.chain")
    assert f.status == "FAIL" and "line 1" in f.message
    r = CliRunner().invoke(app, ["audit", "check", "--config", str(cfg), "--server-state", str(d)])
    assert r.exit_code == 1 and "audit.chain" in r.output
    # the same check through --audit-log alone
    assert _statuses(run_check(cfg, audit_log=log))["audit.chain"] == "FAIL"
    log.unlink()
    assert _statuses(run_check(cfg, server_state=d))["audit.chain"] == "FAIL"  # missing log


def test_expired_certificate_fails_keys_expiry(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = _server_state(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    past = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(past).not_valid_after(past + dt.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    (d / "pki" / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cfg = _write(tmp_path, SAFE_NETWORK)
    f = next(f for f in run_check(cfg, server_state=d).findings if f.control == "keys.expiry")
    assert f.status == "FAIL" and "pki/server.pem" in f.message
    r = CliRunner().invoke(app, ["audit", "check", "--config", str(cfg), "--server-state", str(d), "--format", "json"])
    assert r.exit_code == 1
    assert {x["control"] for x in json.loads(r.output)["findings"] if x["status"] == "FAIL"} == {"keys.expiry"}


def test_expired_keyset_key_fails_and_soon_expiring_warns(tmp_path: Path) -> None:
    from fedproxy_secure.artifacts import create_keyset, generate_key, save_keyset

    d = tmp_path / "state"
    d.mkdir()
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=400)
    save_keyset(create_keyset(generate_key(), name="acme", valid_days=30, now=old), d / "keyset.json")
    cfg = _write(tmp_path, SAFE_NETWORK)
    assert _statuses(run_check(cfg, server_state=d))["keys.expiry"] == "FAIL"
    save_keyset(create_keyset(generate_key(), name="acme", valid_days=10), d / "keyset.json")
    assert _statuses(run_check(cfg, server_state=d))["keys.expiry"] == "WARN"


def test_every_control_names_known_threats() -> None:
    from fedproxy_secure.audit.check import deployment_from_network

    dep, _ = deployment_from_network(SAFE_NETWORK, "x")
    for f in evaluate(dep):
        assert f.threats and all(t.startswith("T") for t in f.threats), f
