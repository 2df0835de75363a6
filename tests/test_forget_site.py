"""``server forget-site NAME`` (issue 26, item 8): after a federation round, the site's rows and files go, what
integrity needs stays (the audit log still verifies, the signed round configs, the global state, the
revocation), a second run changes nothing, and a site in an open round's cohort is refused with the fix."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from typer.testing import CliRunner

import fedproxy_secure.cli.server_net  # noqa: F401  (registers the commands)
from fedproxy_secure.auditlog import verify_log
from fedproxy_secure.cli.app import app
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.pipelines.inmemory import InMemoryFederation
from fedproxy_secure.protocol.names import JOIN_STAGE
from fedproxy_secure.protocol.settings import FederationSettings
from fedproxy_secure.server.forget import forget_site
from fedproxy_secure.server.revocation import load_revoked, record_issued
from fedproxy_secure.server.setup import init_server, server_paths
from fedproxy_secure.wire.binding import graph_commit, new_graph_nonce

TABLES = {"enrolments": "client_id", "submissions": "client_id", "client_reports": "client_id",
          "uploads": "client_id", "upload_chunks": "client_id", "nonces": "client_id"}


def _fed(tmp_path, rounds: int) -> tuple:
    s = FederationSettings.from_dict({"rounds": rounds, "min_clients": 3, "threshold": 2, "mode": "masking",
                                      "dim": 8, "clip_norm": 1.0})
    d = tmp_path / "srv"
    init_server(d, s)
    fed = InMemoryFederation(d, s, n=3)  # same state.db and audit.jsonl as the server folder
    return d, fed


def _rows(d, cid: str, name: str) -> dict[str, int]:
    con = sqlite3.connect(server_paths(d)["db"])
    try:
        out = {t: con.execute(f"SELECT COUNT(*) FROM {t} WHERE {c}=?", (cid,)).fetchone()[0] for t, c in TABLES.items()}
        out["tokens"] = con.execute("SELECT COUNT(*) FROM tokens WHERE name=?", (name,)).fetchone()[0]
        return out
    finally:
        con.close()


def _audit(d) -> list[dict]:
    return [json.loads(x) for x in (d / "audit.jsonl").read_text().splitlines()]


def test_forget_site_after_a_round_deletes_its_rows_and_files_and_keeps_integrity(tmp_path):
    d, fed = _fed(tmp_path, rounds=2)
    rng = np.random.default_rng(0)
    out = fed.run_round({c: rng.normal(size=8) * 0.1 for c in fed.clients})
    assert out.row.status == "done", out.row.reason
    names = {c["name"]: c["client_id"] for c in fed.store.clients()}
    cid, other = names["site0"], names["site1"]
    fed.store.put_client_report(1, cid, {"round_id": 1, "status": "ok", "epsilon": 0.5, "delta": 1e-5,
                                         "accountant": "rdp"})
    record_issued(d, "site0", cid, 12345, 2e9, "00" * 32)  # what CSR enrolment records
    (d / "pki" / "issued" / "site0.pem").write_text("public certificate")
    (d / "kits").mkdir(exist_ok=True)
    (d / "kits" / "site0.json").write_text(json.dumps({"site": "site0", "enrol": "csr"}))
    before, other_before = _rows(d, cid, "site0"), _rows(d, other, "site1")
    assert before["submissions"] > 0 and before["client_reports"] == 1 and before["enrolments"] == 1
    state_before = fed.store.global_state()
    n_audit = len(_audit(d))

    dry = CliRunner().invoke(app, ["server", "forget-site", "site0", "--dir", str(d), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "dry run" in dry.output and "kits/site0.json" in dry.output and "kept: audit log" in dry.output
    assert _rows(d, cid, "site0") == before and len(_audit(d)) == n_audit and "site0" not in load_revoked(d)

    r = CliRunner().invoke(app, ["server", "forget-site", "site0", "--dir", str(d)])
    assert r.exit_code == 0, r.output
    assert "forgotten" in r.output and "revoked now" in r.output
    assert all(v == 0 for v in _rows(d, cid, "site0").values()), _rows(d, cid, "site0")
    assert _rows(d, other, "site1") == other_before  # the other sites keep everything
    assert not any((d / f).exists() for f in ("kits/site0.json", "pki/issued/site0.json", "pki/issued/site0.pem"))
    assert fed.store.global_state() == state_before  # aggregates stay
    assert cid in {c for c, _ in fed.store.get_round(1).config["cohort"]}  # signed round config stays
    rev = load_revoked(d)["site0"]
    assert rev["client_id"] == cid and rev["serials"] == ["12345"] and "forgotten_at" in rev
    ev = [e for e in _audit(d) if e["event"] == "site_forgotten"]
    assert len(ev) == 1 and ev[0]["data"]["client_id"] == cid
    rows = ev[0]["data"]["rows"]
    assert rows["submissions"] + rows["server_messages"] == before["submissions"]
    assert rows["client_reports"] == 1 and rows["enrolments"] == 1 and ev[0]["data"]["files"] == 3
    assert [e["event"] for e in _audit(d)][n_audit:] == ["site_revoked", "site_forgotten"]
    assert verify_log(d / "audit.jsonl").ok
    assert CliRunner().invoke(app, ["server", "status", "--dir", str(d)]).exit_code == 0

    # idempotent: nothing left, nothing changes, no second audit entry
    n_audit = len(_audit(d))
    again = CliRunner().invoke(app, ["server", "forget-site", "site0", "--dir", str(d)])
    assert again.exit_code == 0 and "already forgotten" in again.output
    assert len(_audit(d)) == n_audit and forget_site(d, "site0")["noop"] is True

    # the name is not issued again (its certificate serials stay in the revocation list)
    from fedproxy_secure.server.setup import enroll_site

    with pytest.raises(ConfigError, match="was revoked here"):
        enroll_site(d, "site0", "https://127.0.0.1:1")


def test_forget_site_refuses_a_site_in_an_open_round_and_changes_nothing(tmp_path):
    d, fed = _fed(tmp_path, rounds=1)
    cid = {c["name"]: c["client_id"] for c in fed.store.clients()}["site0"]
    rid = fed.engine.current().round_id
    fed.engine.submit(cid, rid, JOIN_STAGE, {"type": "join", "graph_commit": graph_commit(new_graph_nonce()).hex()})
    n_audit = len(_audit(d))
    with pytest.raises(ConfigError, match=rf"open round {rid} \(stage 'join'\).*server revoke-site site0"):
        forget_site(d, "site0")
    dry = forget_site(d, "site0", dry_run=True)
    assert dry["blocked_by"] == [{"round": rid, "stage": "join"}] and dry["rows"]["submissions"] == 1
    for c in fed.clients:  # the rest join; the cohort is fixed
        if c != cid:
            fed.engine.submit(c, rid, JOIN_STAGE, {"type": "join",
                                                  "graph_commit": graph_commit(new_graph_nonce()).hex()})
    fed.engine.tick()
    row = fed.store.get_round(rid)
    assert row.status == "open" and row.stage != "join" and cid in {c for c, _ in row.config["cohort"]}
    n_audit = len(_audit(d))
    r = CliRunner().invoke(app, ["server", "forget-site", "site0", "--dir", str(d)])
    assert isinstance(r.exception, ConfigError) and "cohort of open round" in str(r.exception)
    assert "site0" not in load_revoked(d) and len(_audit(d)) == n_audit
    assert fed.store.client_key(cid) is not None  # still enrolled and active


def test_forget_an_unknown_site_names_the_problem(tmp_path):
    d, _fed_ = _fed(tmp_path, rounds=1)
    with pytest.raises(ConfigError, match="never enrolled here"):
        forget_site(d, "nobody")
    r = CliRunner().invoke(app, ["server", "forget-site", "--help"])
    assert r.exit_code == 0 and "--dry-run" in r.output
