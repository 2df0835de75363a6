"""The keyed, anchored audit log: an HMAC chain a file-writer cannot recompute, and signed heads.

The attacks are the auditor's: delete an entry and recompute the (unkeyed) hashes of every later
line; strip the MACs too; truncate the tail after an exported head; rewrite history before it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import fedproxy_secure.cli.audit_check  # noqa: F401  (registers the commands)
import fedproxy_secure.cli.audit_log  # noqa: F401
from fedproxy_secure.artifacts.keyfiles import OPERATOR_PASSPHRASE_ENV
from fedproxy_secure.artifacts.keys import generate_key, load_operator_key, load_public_key
from fedproxy_secure.auditlog import (GENESIS, AuditLog, canonical_json, entry_hash, export_head, verify_head,
                                       verify_log)
from fedproxy_secure.cli.app import app
from fedproxy_secure.errors import SecurityError
from fedproxy_secure.server.rounds import FederationSettings
from fedproxy_secure.server.setup import init_server

PP = "a long operator passphrase"
NETWORK = {"clients": 3, "federation": {"rounds": 3, "min_clients": 3, "threshold": 3, "mode": "masking", "dim": 8,
                                        "clip_norm": 1.0},
           "dp": {"enabled": True, "epsilon": 8.0, "delta": 1.0e-5}, "transport": {"mtls": True, "tls_min_version": "1.3"}}


@pytest.fixture
def server(tmp_path, monkeypatch) -> Path:
    """A real server folder (encrypted operator key, audit secret) with a few audited events."""
    monkeypatch.setenv(OPERATOR_PASSPHRASE_ENV, PP)
    d = tmp_path / "srv"
    init_server(d, FederationSettings.from_dict({"rounds": 3, "min_clients": 3, "threshold": 2, "dim": 8}))
    log = AuditLog(d / "audit.jsonl")
    assert log.keyed
    for i in range(5):
        log.append("accept", {"round": 1, "client": f"c{i}", "stage": "masked_input"})
    return d


def flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


def lines(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def rewrite(p: Path, entries: list[dict], keep_macs: bool) -> None:
    """Recompute seq, prev_hash and hash of every line, as an attacker without the key can."""
    prev, out = GENESIS, []
    for i, e in enumerate(entries):
        e = {k: v for k, v in e.items() if k != "hash" and (keep_macs or k != "mac")}
        e["seq"], e["prev_hash"] = i, prev
        e["hash"] = entry_hash(e)
        prev = e["hash"]
        out.append(canonical_json(e) + b"\n")
    p.write_bytes(b"".join(out))


def test_keyed_log_verifies_with_its_key(server):
    res = verify_log(server / "audit.jsonl")
    assert res.ok and res.keyed and res.lines == 6, res
    assert all("mac" in e for e in lines(server / "audit.jsonl"))
    assert "MACs verified" in res.message()


@pytest.mark.parametrize("keep_macs", [True, False], ids=["macs-kept", "macs-stripped"])
def test_deleted_entry_with_recomputed_hashes_is_refused(server, keep_macs):
    p = server / "audit.jsonl"
    entries = lines(p)
    del entries[2]  # drop one accepted submission
    rewrite(p, entries, keep_macs)
    assert verify_log(p, key=None).ok  # the unkeyed chain alone is fooled: this is the attack
    res = verify_log(p)
    assert not res.ok and res.bad_line == (3 if keep_macs else 1), res
    assert ("MAC does not verify" if keep_macs else "no MAC") in res.reason
    with pytest.raises(SecurityError, match="fails verification"):
        AuditLog(p)  # the server refuses to extend it


def test_keyed_log_never_takes_an_unkeyed_line(server):
    p = server / "audit.jsonl"
    with pytest.raises(SecurityError, match="keyed but was opened without a MAC key"):
        AuditLog(p, key=None)
    with open(p, "ab") as fh:  # an unkeyed line appended by hand
        e = {"seq": 6, "ts": 1.0, "event": "x", "data": {}, "prev_hash": lines(p)[-1]["hash"]}
        e["hash"] = entry_hash(e)
        fh.write(canonical_json(e) + b"\n")
    res = verify_log(p, key=None)
    assert not res.ok and res.bad_line == 7 and "mixed" in res.reason


def test_signed_head_refuses_truncation_and_rewritten_history(server):
    p = server / "audit.jsonl"
    op = load_operator_key(server / "keys" / "operator.key")
    pub = load_public_key(server / "keys" / "operator.pub")
    head = verify_head(export_head(p, op), pub)
    assert head["index"] == 5 and head["entries"] == 6 and head["keyed"] is True
    AuditLog(p).append("round_close", {"round": 1})  # growth after the head is fine
    assert verify_log(p, head=head).ok and verify_log(p, head=head).anchored
    original = p.read_bytes()
    # truncate after the head: the last two entries go (a valid chain, MACs intact)
    p.write_bytes(b"".join(original.splitlines(keepends=True)[:5]))
    assert verify_log(p).ok
    res = verify_log(p, head=head)
    assert not res.ok and "tail truncated" in res.reason and "covers 6" in res.reason
    # unkeyed verifier (no secret at hand): history rewritten before the head is still refused
    p.write_bytes(original)
    entries = lines(p)
    del entries[1]
    rewrite(p, entries, keep_macs=False)
    res = verify_log(p, key=None, head=head)
    assert not res.ok and "history rewritten" in res.reason


def test_head_signature_is_checked(server):
    p = server / "audit.jsonl"
    op = load_operator_key(server / "keys" / "operator.key")
    pub = load_public_key(server / "keys" / "operator.pub")
    doc = export_head(p, op)
    with pytest.raises(SecurityError, match="does not verify"):
        verify_head({**doc, "index": 2}, pub)  # moved back to hide a later deletion
    with pytest.raises(SecurityError, match="unknown key"):
        verify_head(export_head(p, generate_key()), pub)
    with pytest.raises(SecurityError, match="not a signed audit head"):
        verify_head({k: v for k, v in doc.items() if k != "signature"}, pub)
    entries = lines(p)
    del entries[3]
    rewrite(p, entries, keep_macs=True)
    with pytest.raises(SecurityError, match="refusing to sign the head of a broken log"):
        export_head(p, op)


def test_cli_export_head_verify_log_and_check_head(server, tmp_path):
    runner = CliRunner()
    head = tmp_path / "head-1.json"
    r = runner.invoke(app, ["audit", "export-head", "--server-dir", str(server), "--out", str(head)])
    assert r.exit_code == 0, r.output
    assert "signed head" in r.output and json.loads(head.read_text())["keyed"] is True
    log = server / "audit.jsonl"
    r = runner.invoke(app, ["audit", "verify-log", str(log), "--head", str(head)])
    assert r.exit_code == 0 and "MACs verified, matches the signed head" in flat(r.output), r.output
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(NETWORK))
    r = runner.invoke(app, ["audit", "check", "--config", str(cfg), "--server-state", str(server), "--head", str(head),
                            "--format", "json"])
    found = {f["control"]: f for f in json.loads(r.output)["findings"]}
    assert found["audit.head"]["status"] == "PASS", found["audit.head"]

    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:4]))  # cut after the head
    r = runner.invoke(app, ["audit", "verify-log", str(log), "--head", str(head)])
    assert r.exit_code == 1 and "tail truncated" in flat(r.output), r.output
    r = runner.invoke(app, ["audit", "check", "--config", str(cfg), "--server-state", str(server), "--head", str(head),
                            "--format", "json"])
    found = {f["control"]: f for f in json.loads(r.output)["findings"]}
    assert r.exit_code == 1 and found["audit.head"]["status"] == "FAIL" and "truncated" in found["audit.head"]["message"]
