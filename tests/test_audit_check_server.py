"""``audit check --server-dir``: the deployment a server folder runs, read from its files (issue 20).

Each deployment is made by the code behind ``server init`` / ``server enroll``; each control that reads
the folder is shown to PASS on a clean folder and to FAIL once the folder is made unsafe.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import fedproxy_secure.cli.audit_check  # noqa: F401  (registers the command)
import fedproxy_secure.cli.server_net  # noqa: F401  (registers server init / enroll)
from fedproxy_secure.artifacts.keyfiles import OPERATOR_PASSPHRASE_ENV
from fedproxy_secure.audit.check import deployment_from_server_dir, run_check
from fedproxy_secure.audit.controls import CONTROLS
from fedproxy_secure.cli.app import app
from fedproxy_secure.errors import ConfigError

PASSPHRASE = "correct horse battery staple"
DP = {"enabled": True, "epsilon": 6.0, "delta": 1.0e-5}


def _statuses(rep) -> dict[str, str]:
    return {f.control: f.status for f in rep.findings}


def _init(tmp: Path, monkeypatch, *, passphrase: str | None = PASSPHRASE, **settings) -> Path:
    from fedproxy_secure.protocol.settings import FederationSettings
    from fedproxy_secure.server.setup import init_server

    if passphrase is None:
        monkeypatch.delenv(OPERATOR_PASSPHRASE_ENV, raising=False)
    else:
        monkeypatch.setenv(OPERATOR_PASSPHRASE_ENV, passphrase)
    base = dict(rounds=2, min_clients=3, threshold=3, mode="masking", dim=8, clip_norm=1.0, train={"dp": DP})
    base.update(settings)
    d = tmp / "srv"
    init_server(d, FederationSettings.from_dict(base))
    return d


def _client_yaml(tmp: Path, policy: dict | None = None) -> Path:
    p = tmp / "client.yaml"
    doc = {"enrolment": "site0", "trainer": "synthetic", "dp": {"enabled": True, "epsilon": 8.0, "delta": 1e-5}}
    if policy is not None:
        doc["policy"] = policy
    p.write_text(yaml.safe_dump(doc))
    return p


def test_clean_deployment_passes(tmp_path: Path, monkeypatch) -> None:
    d = _init(tmp_path, monkeypatch)
    rep = run_check(server_dir=d, client_config=_client_yaml(tmp_path))
    st = _statuses(rep)
    assert set(st) == set(CONTROLS)
    assert rep.result == "PASS" and rep.exit_code == 0, [f for f in rep.findings if f.status in ("FAIL", "WARN")]
    for c in ("keys.operator_at_rest", "keys.permissions", "enrol.leftovers", "transport.mtls", "audit.chain",
              "report.contents", "client.policy", "secagg.identity", "keys.revocation", "dp.enabled"):
        assert st[c] == "PASS", (c, st[c])
    r = CliRunner().invoke(app, ["audit", "check", "--server-dir", str(d), "--client-config",
                                 str(tmp_path / "client.yaml"), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["result"] == "PASS"


def test_unencrypted_operator_key_fails_and_encrypted_passes(tmp_path: Path, monkeypatch) -> None:
    plain = _init(tmp_path / "a", monkeypatch, passphrase=None)
    assert _statuses(run_check(server_dir=plain))["keys.operator_at_rest"] == "FAIL"
    r = CliRunner().invoke(app, ["audit", "check", "--server-dir", str(plain), "--format", "json"])
    assert r.exit_code == 1, r.output
    f = next(x for x in json.loads(r.output)["findings"] if x["control"] == "keys.operator_at_rest")
    assert f["status"] == "FAIL" and "FEDPROXY_OPERATOR_PASSPHRASE" in f["message"]
    enc = _init(tmp_path / "b", monkeypatch, passphrase=PASSPHRASE)
    assert (enc / "keys" / "operator.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert _statuses(run_check(server_dir=enc))["keys.operator_at_rest"] == "PASS"


def test_server_init_cli_then_legacy_enrol_folder_fails(tmp_path: Path, monkeypatch) -> None:
    """The CLI path end to end: `server init` with a passphrase, `server enroll` (legacy handover folder)."""
    monkeypatch.setenv(OPERATOR_PASSPHRASE_ENV, PASSPHRASE)
    d = tmp_path / "srv"
    r = CliRunner().invoke(app, ["server", "init", "--dir", str(d), "--min-clients", "3", "--threshold", "3"])
    assert r.exit_code == 0, r.output
    assert _statuses(run_check(server_dir=d))["enrol.leftovers"] == "PASS"
    r = CliRunner().invoke(app, ["server", "enroll", "site0", "--dir", str(d), "--url", "https://127.0.0.1:9"])
    assert r.exit_code == 0, r.output
    f = next(f for f in run_check(server_dir=d).findings if f.control == "enrol.leftovers")
    assert f.status == "FAIL" and "enrol/site0/" in f.message, f
    r = CliRunner().invoke(app, ["audit", "check", "--server-dir", str(d), "--format", "json"])
    assert r.exit_code == 1
    fails = {x["control"] for x in json.loads(r.output)["findings"] if x["status"] == "FAIL"}
    assert "enrol.leftovers" in fails and "keys.operator_at_rest" not in fails
    # handed over: the folder removed from the server, the control passes again
    import shutil

    shutil.rmtree(d / "enrol" / "site0")
    assert _statuses(run_check(server_dir=d))["enrol.leftovers"] == "PASS"


def test_group_readable_private_key_fails_permissions_and_mtls(tmp_path: Path, monkeypatch) -> None:
    d = _init(tmp_path, monkeypatch)
    os.chmod(d / "pki" / "server.key", 0o640)
    rep = run_check(server_dir=d)
    f = {x.control: x for x in rep.findings}
    assert f["keys.permissions"].status == "FAIL" and "pki/server.key" in f["keys.permissions"].message
    # the server would refuse to build its TLS context from that key: mTLS is not derived as on
    assert f["transport.mtls"].status == "FAIL" and "chmod 600" in f["transport.mtls"].message
    os.chmod(d / "pki" / "server.key", 0o600)
    os.chmod(d / "keys" / "audit.secret", 0o604)
    f = {x.control: x for x in run_check(server_dir=d).findings}
    assert f["keys.permissions"].status == "FAIL" and "keys/audit.secret" in f["keys.permissions"].message
    assert f["audit.chain"].status == "FAIL" and "chmod 600" in f["audit.chain"].message


def test_server_certificate_from_another_ca_fails_mtls(tmp_path: Path, monkeypatch) -> None:
    from fedproxy_secure.transport.pki import create_ca, issue_server_cert

    d = _init(tmp_path, monkeypatch)
    assert _statuses(run_check(server_dir=d))["transport.mtls"] == "PASS"
    other = create_ca(tmp_path / "evil")
    issue_server_cert(other, tmp_path / "evil", ("127.0.0.1",))
    (d / "pki" / "server.pem").write_bytes((tmp_path / "evil" / "server.pem").read_bytes())
    os.replace(tmp_path / "evil" / "server.key", d / "pki" / "server.key")
    f = next(x for x in run_check(server_dir=d).findings if x.control == "transport.mtls")
    assert f.status == "FAIL" and "not issued by pki/ca.pem" in f.message, f


def test_settings_come_from_federation_json(tmp_path: Path, monkeypatch) -> None:
    """verify_aggregate, h_norm, mode and DP are read from the folder's federation.json, not from a YAML."""
    he = _init(tmp_path / "he", monkeypatch, mode="he", he={"verify_aggregate": False})
    assert _statuses(run_check(server_dir=he))["he.verify_aggregate"] == "FAIL"
    he_ok = _init(tmp_path / "he2", monkeypatch, mode="he")
    st = _statuses(run_check(server_dir=he_ok))
    assert st["he.verify_aggregate"] == "PASS" and st["he.flooding"] == "PASS"
    sa = _init(tmp_path / "sa", monkeypatch, aggregator="sa_hties", sa_hties={"h_norm": "reveal"})
    assert _statuses(run_check(server_dir=sa))["sa_hties.h_norm"] == "WARN"
    from fedproxy_secure.audit.controls import Policy

    assert _statuses(run_check(server_dir=sa, policy=Policy(h_reveal="FAIL")))["sa_hties.h_norm"] == "FAIL"
    r = CliRunner().invoke(app, ["audit", "check", "--server-dir", str(sa), "--h-reveal", "fail"])
    assert r.exit_code == 1 and "sa_hties.h_norm" in r.output
    sa_none = _init(tmp_path / "sa2", monkeypatch, aggregator="sa_hties", sa_hties={"h_norm": "none"})
    assert _statuses(run_check(server_dir=sa_none))["sa_hties.h_norm"] == "PASS"
    plain = _init(tmp_path / "pl", monkeypatch, mode="plain", train={})
    st = _statuses(run_check(server_dir=plain))
    assert st["secagg.mode"] == "FAIL" and st["dp.enabled"] == "FAIL"


def test_threshold_uses_the_enrolled_cohort(tmp_path: Path, monkeypatch) -> None:
    """n is the larger of min_clients and the active enrolments; t is raised by the one threshold rule."""
    from fedproxy_secure.wire.threshold import effective_threshold

    d = _init(tmp_path, monkeypatch, threshold=2)
    dep = deployment_from_server_dir(d)
    assert dep.n_clients == 3 and dep.effective_threshold == effective_threshold("masking", 3, 2) == 2
    con = sqlite3.connect(d / "state.db")
    with con:
        for i in range(5):
            con.execute("INSERT INTO enrolments VALUES(?,?,?,?, 'active')", (f"c-{i}", f"site{i}", bytes(32), 0.0))
    con.close()
    dep = deployment_from_server_dir(d)
    assert dep.n_clients == 5 and dep.effective_threshold == effective_threshold("masking", 5, 2) == 3


def test_stored_report_with_training_statistic_fails_report_contents(tmp_path: Path, monkeypatch) -> None:
    d = _init(tmp_path, monkeypatch)
    con = sqlite3.connect(d / "state.db")
    with con:
        con.execute("INSERT INTO client_reports VALUES(1, 'c-1', ?)",
                    (json.dumps({"epsilon": 1.0, "status": "trained"}),))
    con.close()
    assert _statuses(run_check(server_dir=d))["report.contents"] == "PASS"
    con = sqlite3.connect(d / "state.db")
    with con:
        con.execute("INSERT INTO client_reports VALUES(2, 'c-1', ?)", (json.dumps({"epsilon": 1.0, "train_loss": 2.3}),))
    con.close()
    f = next(x for x in run_check(server_dir=d).findings if x.control == "report.contents")
    assert f.status == "FAIL" and "train_loss" in f.message


def test_audit_log_copy_of_a_full_report_fails_report_contents(tmp_path: Path, monkeypatch) -> None:
    from fedproxy_secure.auditlog import AuditLog

    d = _init(tmp_path, monkeypatch)
    AuditLog(d / "audit.jsonl").append("client_report", {"round": 1, "client": "c-1",
                                                         "report": {"epsilon": 1.0, "pre_clip_norm": 3.1}})
    st = _statuses(run_check(server_dir=d))
    assert st["report.contents"] == "FAIL" and st["audit.chain"] == "PASS"


def test_revoked_operator_key_in_keyset_fails(tmp_path: Path, monkeypatch) -> None:
    from fedproxy_secure.artifacts import create_keyset, generate_key, save_keyset
    from fedproxy_secure.artifacts.keyfiles import load_pem_private_key_file
    from fedproxy_secure.artifacts.keyset import revoke_key, rotate_keyset
    from fedproxy_secure.artifacts.keys import key_id

    d = _init(tmp_path, monkeypatch)
    op = load_pem_private_key_file(d / "keys" / "operator.key", PASSPHRASE.encode())
    ks = create_keyset(op, name="acme", valid_days=365)
    save_keyset(ks, d / "keys" / "keyset.json")
    f = next(x for x in run_check(server_dir=d).findings if x.control == "keys.revocation")
    assert f.status == "PASS" and "0 revoked keyset key" in f.message, f
    new = generate_key()
    ks2 = revoke_key(rotate_keyset(ks, op, new.public_key()), new, key_id(op))
    save_keyset(ks2, d / "keys" / "keyset.json")
    f = next(x for x in run_check(server_dir=d).findings if x.control == "keys.revocation")
    assert f.status == "FAIL" and "revoked" in f.message, f


def test_revoked_site_is_listed(tmp_path: Path, monkeypatch) -> None:
    d = _init(tmp_path, monkeypatch)
    con = sqlite3.connect(d / "state.db")
    with con:
        con.execute("INSERT INTO enrolments VALUES('c-9','site9',?,0.0,'revoked')", (bytes(32),))
    con.close()
    f = next(x for x in run_check(server_dir=d).findings if x.control == "keys.revocation")
    assert f.status == "PASS" and "1 revoked site(s) (site9)" in f.message


def test_unkeyed_audit_log_warns_and_broken_one_fails(tmp_path: Path, monkeypatch) -> None:
    d = _init(tmp_path, monkeypatch)
    (d / "keys" / "audit.secret").unlink()
    assert _statuses(run_check(server_dir=d))["audit.chain"] == "WARN"
    log = d / "audit.jsonl"
    log.write_text(log.read_text().replace('"server_init"', '"server_inix"'))
    assert _statuses(run_check(server_dir=d))["audit.chain"] == "FAIL"


def test_weak_client_policy_fails_and_decides_identity(tmp_path: Path, monkeypatch) -> None:
    d = _init(tmp_path, monkeypatch)
    st = _statuses(run_check(server_dir=d))
    assert st["client.policy"] == "N/A" and st["secagg.identity"] == "WARN"  # not asserted without a policy
    weak = _client_yaml(tmp_path, {"require_identities": False})
    st = _statuses(run_check(server_dir=d, client_config=weak))
    assert st["client.policy"] == "FAIL" and st["secagg.identity"] == "FAIL"
    for pol, needle in [({"modes": ["masking", "plain"]}, "plain"), ({"min_threshold_fraction": 0.3}, "fraction"),
                        ({"require_verify_aggregate": False}, "verify_aggregate"), ({"max_epsilon": None}, "max_epsilon"),
                        ({"min_cohort": 2}, "min_cohort"), ({"require_dp": False}, "require_dp"),
                        ({"he_requires_roster": False}, "he_requires_roster")]:
        f = next(x for x in run_check(server_dir=d, client_config=_client_yaml(tmp_path, pol)).findings
                 if x.control == "client.policy")
        assert f.status == "FAIL" and needle in f.message, (pol, f)
    f = next(x for x in run_check(server_dir=d, client_config=_client_yaml(tmp_path, {"modes": ["he"]})).findings
             if x.control == "client.policy")
    assert f.status == "WARN" and "masking" in f.message
    with pytest.raises(ConfigError, match="policy.min_cohort"):
        run_check(server_dir=d, client_config=_client_yaml(tmp_path, {"min_cohort": "many"}))


def test_cli_refuses_missing_or_conflicting_sources(tmp_path: Path, monkeypatch) -> None:
    d = _init(tmp_path, monkeypatch)
    r = CliRunner().invoke(app, ["audit", "check"])
    assert isinstance(r.exception, ConfigError) and "--server-dir" in str(r.exception)
    r = CliRunner().invoke(app, ["audit", "check", "--server-dir", str(tmp_path / "nothere")])
    assert isinstance(r.exception, ConfigError) and "federation.json" in str(r.exception)
    cfg = tmp_path / "x.yaml"
    cfg.write_text("clients: 3\nfederation: {mode: masking}\n")
    r = CliRunner().invoke(app, ["audit", "check", "--server-dir", str(d), "--config", str(cfg)])
    assert isinstance(r.exception, ConfigError) and "not both" in str(r.exception)
