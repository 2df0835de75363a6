"""``server revoke-site NAME`` (issue 20): a revoked site's identity key is refused at once with a clear reason,
its certificate at the TLS handshake once the server restarts with the CRL; other sites keep working; audited.
``server start`` runs with the CA key offline."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

import fedproxy_secure.cli.server_net  # noqa: F401  (registers the commands)
from fedproxy_secure.auditlog import AuditLog, verify_log
from fedproxy_secure.cli.app import app
from fedproxy_secure.client.join import ClientSession
from fedproxy_secure.errors import ConfigError, SecurityError
from fedproxy_secure.server.enrol_csr import enrol_csr
from fedproxy_secure.server.setup import server_paths
from fedproxy_secure.server.store import SQLiteStore
from fedproxy_secure.transport.http import ServerUnreachable
from fedproxy_secure.transport.pki import make_csr, new_tls_key
from tests.kit_net_helpers import make_kit_server
from tests.net_helpers import start_server, stop


def _session(site, retry_s: float = 5.0) -> ClientSession:
    return ClientSession(site, site / "state", retry_s=retry_s)


def test_revoked_site_is_refused_with_a_reason_and_others_keep_working(tmp_path):
    d, port, sites = make_kit_server(tmp_path, 4)
    srv = start_server(d, port)
    sessions = []
    try:
        sessions = [_session(s) for s in sites[:3]]  # CSR enrolment at first join (site3 never enrols)
        ids = [s.enroll() for s in sessions]
        assert all(s.federation()["rounds_total"] == 1 for s in sessions)
        r = CliRunner().invoke(app, ["server", "revoke-site", "site0", "--dir", str(d), "--reason", "laptop stolen"])
        assert r.exit_code == 0, r.output
        assert "revoked" in r.output and "CRL" in r.output
        with pytest.raises(SecurityError, match=r"401: client .* \(site 'site0'\) was revoked by the operator"):
            sessions[0].federation()
        assert sessions[1].federation()["rounds_total"] == 1 and sessions[2].federation()["finished"] is False
        # a site that never enrolled: its kit's token is dead too
        assert CliRunner().invoke(app, ["server", "revoke-site", "site3", "--dir", str(d)]).exit_code == 0
        store = SQLiteStore(server_paths(d)["db"])
        try:
            with pytest.raises(SecurityError):
                enrol_csr(d, store, AuditLog(d / "audit.jsonl"), (sites[3] / "token").read_text().strip(),
                          os.urandom(32), make_csr(new_tls_key(), "site3"))
        finally:
            store.close()
    finally:
        for s in sessions:
            s.close()
        stop(srv)
    lines = [json.loads(x) for x in (d / "audit.jsonl").read_text().splitlines()]
    rev = [e["data"] for e in lines if e["event"] == "site_revoked"]
    assert rev[0]["name"] == "site0" and rev[0]["client_id"] == ids[0] and rev[0]["reason"] == "laptop stolen"
    assert rev[0]["crl_updated"] is True and len(rev[0]["serials"]) == 1
    assert any(e["event"] == "reject" and "revoked" in e["data"]["reason"] for e in lines)
    assert verify_log(d / "audit.jsonl").ok

    # restart with the CA key offline: start does not need it, and the CRL refuses site0 at the handshake
    p = server_paths(d)
    os.rename(p["ca_key"], tmp_path / "ca.key.offline")
    srv = start_server(d, port)
    try:
        s1, s0 = _session(sites[1]), _session(sites[0], retry_s=1.0)
        try:
            assert s1.federation()["rounds_total"] == 1
            with pytest.raises(ServerUnreachable):
                s0.federation()
        finally:
            s0.close()
            s1.close()
    finally:
        stop(srv)


def test_revoke_an_unknown_site_names_the_problem(tmp_path):
    from fedproxy_secure.server.revocation import revoke_site

    d, _port, _sites = make_kit_server(tmp_path, 1)
    with pytest.raises(ConfigError, match="never enrolled here"):
        revoke_site(d, "nobody")
    r = CliRunner().invoke(app, ["server", "revoke-site", "nobody", "--dir", str(d)])
    assert isinstance(r.exception, ConfigError)
    assert not (d / "pki" / "revoked.json").exists()


def test_two_writers_of_one_audit_log_keep_one_valid_chain(tmp_path):
    """revoke-site appends to audit.jsonl while the server process holds it open: the chain must stay valid."""
    from fedproxy_secure.auditlog import create_audit_secret

    create_audit_secret(tmp_path)
    server_log, cli_log = AuditLog(tmp_path / "audit.jsonl"), None
    server_log.append("server_init", {})
    cli_log = AuditLog(tmp_path / "audit.jsonl")  # opened later, as the CLI is
    for i in range(3):
        server_log.append("tick", {"i": i})
        cli_log.append("site_revoked", {"i": i})
    res = verify_log(tmp_path / "audit.jsonl")
    assert res.ok and res.lines == 7, res
