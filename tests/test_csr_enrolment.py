"""CSR enrolment from a site kit (issue 20 "Enrolment with CSRs", issue 18 site kit).

The site makes its own TLS key at first join and sends a CSR with its one-time token to the enrolment
listener; the server checks the token, the CSR and the site name, signs a short-lived client certificate
and never holds a site's private key. Refusals: reused token, CSR for another name, bad CSR signature,
CA key offline; then three kit-enrolled sites complete a masking round over the real sockets.
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedproxy_secure.auditlog import AuditLog, verify_log
from fedproxy_secure.errors import ConfigError, SecurityError
from fedproxy_secure.server.enrol_csr import enrol_csr, pending_kits
from fedproxy_secure.server.setup import server_paths
from fedproxy_secure.server.store import SQLiteStore
from fedproxy_secure.transport.pki import check_csr, load_cert, make_csr, new_tls_key
from tests.kit_net_helpers import make_kit_server, public_keys_of_private_files
from tests.net_helpers import PY, ROOT, db_rounds, env, expected_sum, result_sum, start_server, stop


def _der(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _token(site) -> str:
    return (site / "token").read_text().strip()


@pytest.fixture()
def fed(tmp_path):
    d, port, sites = make_kit_server(tmp_path, 3)
    store = SQLiteStore(server_paths(d)["db"])
    yield d, port, sites, store, AuditLog(server_paths(d)["audit"])
    store.close()


def test_csr_is_signed_for_the_token_site_and_the_server_holds_no_site_key(fed):
    d, _port, sites, store, audit = fed
    key, ident = new_tls_key(), os.urandom(32)
    r = enrol_csr(d, store, audit, _token(sites[0]), ident, make_csr(key, "site0"))
    cert = x509.load_pem_x509_certificate(r["cert"].encode())
    ca = load_cert(server_paths(d)["ca"])
    cert.verify_directly_issued_by(ca)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert r["name"] == "site0" and cert.subject.rfc4514_string() == "CN=site0"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life.days <= 31  # short-lived (the kit's default 30 days)
    assert _der(key) not in public_keys_of_private_files(d)  # the server folder holds no site private key
    issued = json.loads((d / "pki" / "issued" / "site0.json").read_text())
    assert int(issued["serial"]) == cert.serial_number and issued["client_id"] == r["client_id"]
    assert store.client_key(r["client_id"]) == ident
    assert pending_kits(d) == ["site1", "site2"]
    assert verify_log(d / "audit.jsonl").ok
    assert any(json.loads(x)["event"] == "enrol_csr" for x in (d / "audit.jsonl").read_text().splitlines())


def test_reused_token_is_refused(fed):
    d, _port, sites, store, audit = fed
    enrol_csr(d, store, audit, _token(sites[1]), os.urandom(32), make_csr(new_tls_key(), "site1"))
    with pytest.raises(SecurityError, match="already used"):
        enrol_csr(d, store, audit, _token(sites[1]), os.urandom(32), make_csr(new_tls_key(), "site1"))


def test_csr_for_another_name_is_refused_and_does_not_spend_the_token(fed):
    d, _port, sites, store, audit = fed
    with pytest.raises(SecurityError, match="token is for site 'site0'"):
        enrol_csr(d, store, audit, _token(sites[0]), os.urandom(32), make_csr(new_tls_key(), "site1"))
    with pytest.raises(SecurityError, match="token is not valid"):
        enrol_csr(d, store, audit, _token(sites[0]) + "x", os.urandom(32), make_csr(new_tls_key(), "site0"))
    assert store.clients() == []
    enrol_csr(d, store, audit, _token(sites[0]), os.urandom(32), make_csr(new_tls_key(), "site0"))  # still usable


def test_csr_with_a_bad_signature_is_refused(fed):
    d, _port, sites, store, audit = fed
    csr = x509.load_pem_x509_csr(make_csr(new_tls_key(), "site2"))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    sig = csr.signature
    i = bytes(der).rindex(sig) + len(sig) // 2
    der[i] ^= 0x01  # one bit of the signature
    bad = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(SecurityError, match="signature does not verify"):
        check_csr(bad, "site2")
    with pytest.raises(SecurityError, match="signature does not verify"):
        enrol_csr(d, store, audit, _token(sites[2]), os.urandom(32), bad)
    with pytest.raises(SecurityError, match="not a PEM"):
        enrol_csr(d, store, audit, _token(sites[2]), os.urandom(32), b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n")
    assert store.clients() == []


def test_signing_needs_the_ca_key_and_says_so(fed):
    d, _port, sites, store, audit = fed
    p = server_paths(d)
    os.rename(p["ca_key"], d / "ca.key.offline")
    with pytest.raises(ConfigError, match="kept offline"):
        enrol_csr(d, store, audit, _token(sites[0]), os.urandom(32), make_csr(new_tls_key(), "site0"))
    assert store.clients() == []  # the token is not spent


@pytest.mark.slow  # ~25 s: a server and three client processes run a round
def test_kit_sites_enrol_over_the_listener_and_complete_a_round(tmp_path):
    import subprocess

    d, port, sites = make_kit_server(tmp_path, 3)
    srv = start_server(d, port)
    clients = []
    try:
        for i, site in enumerate(sites):
            log = open(tmp_path / f"client{i}.log", "ab")
            clients.append(subprocess.Popen(
                [PY, "-m", "fedproxy_secure.client.join_main", "--enrol", str(site), "--state", str(site / "state"),
                 "--seed", str(i), "--out", str(tmp_path / f"client{i}.json")],
                cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT))
        for i, c in enumerate(clients):
            c.wait(90)
            assert c.returncode == 0, (tmp_path / f"client{i}.log").read_text()
        rounds = db_rounds(d)
        assert [r[1] for r in rounds] == ["done"]
        np.testing.assert_allclose(result_sum(rounds[0][3]), expected_sum(range(3), 1, 8), atol=1e-8)
        # a replayed enrolment over HTTP: the token is spent
        from fedproxy_secure.artifacts.keys import generate_key
        from fedproxy_secure.transport.http import SignedClient
        from fedproxy_secure.transport.signing import b64u

        ident = generate_key()
        pub = ident.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        http = SignedClient(f"https://127.0.0.1:{port + 1}", sites[0] / "ca.pem", None, None, ident, retry_s=5)
        try:
            r = http.post_json("/v1/csr", {"token": _token(sites[0]), "pubkey": b64u(pub),
                                           "csr": make_csr(new_tls_key(), "site0").decode()})
        finally:
            http.close()
        assert r.status == 403 and "already used" in r.json()["error"]
    finally:
        for c in clients:
            stop(c)
        stop(srv)
    server_pubs = public_keys_of_private_files(d)
    for site in sites:
        key_file = site / "client.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = serialization.load_pem_private_key(key_file.read_bytes(), None)
        assert _der(key) not in server_pubs  # never on the server
        assert all(key_file.read_bytes() not in p.read_bytes() for p in d.rglob("*") if p.is_file())
        cert = x509.load_pem_x509_certificate((site / "client.pem").read_bytes())
        assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert json.loads((tmp_path / "client0.json").read_text())["rounds_done"] == [1]
    assert verify_log(d / "audit.jsonl").ok


def test_a_lost_reply_can_be_fetched_again_only_by_the_same_site(fed):
    """The token is spent when the server signs; if the reply is lost the same identity key and TLS key get the
    same certificate again, while anyone else holding the token is refused."""
    d, _port, sites, store, audit = fed
    key, ident = new_tls_key(), os.urandom(32)
    first = enrol_csr(d, store, audit, _token(sites[0]), ident, make_csr(key, "site0"))
    again = enrol_csr(d, store, audit, _token(sites[0]), ident, make_csr(key, "site0"))
    assert again == first
    with pytest.raises(SecurityError, match="already used"):  # same identity, another TLS key
        enrol_csr(d, store, audit, _token(sites[0]), ident, make_csr(new_tls_key(), "site0"))
    with pytest.raises(SecurityError, match="already used"):  # another identity, same TLS key
        enrol_csr(d, store, audit, _token(sites[0]), os.urandom(32), make_csr(key, "site0"))


def test_the_site_installs_only_a_certificate_from_its_ca_for_its_key_and_name(fed):
    from fedproxy_secure.transport.pki import check_issued, create_ca

    d, _port, sites, store, audit = fed
    key = new_tls_key()
    pem = enrol_csr(d, store, audit, _token(sites[0]), os.urandom(32), make_csr(key, "site0"))["cert"].encode()
    ca_pem = server_paths(d)["ca"].read_bytes()
    assert check_issued(pem, ca_pem, key, "site0").subject.rfc4514_string() == "CN=site0"
    with pytest.raises(SecurityError, match="not for this site's key"):
        check_issued(pem, ca_pem, new_tls_key(), "site0")
    with pytest.raises(SecurityError, match="names"):
        check_issued(pem, ca_pem, key, "site1")
    other = create_ca(d.parent / "other-ca")
    with pytest.raises(SecurityError, match="does not verify against the kit's CA"):
        check_issued(pem, other.cert.read_bytes(), key, "site0")
