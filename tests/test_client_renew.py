"""``client renew`` (issue 26, item 8): a new certificate for the same identity key, client id and site name;
the state folder (privacy budget) is untouched; the site proves possession of its identity key and of its
current certificate key; an expired certificate renews only within the grace window; every serial issued to
a site ends up in the CRL when it is revoked."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os

import pytest
from cryptography import x509

from fedproxy_secure.auditlog import AuditLog, verify_log
from fedproxy_secure.client.join import ClientSession
from fedproxy_secure.client.renew import renew_certificate as client_renew
from fedproxy_secure.errors import SecurityError
from fedproxy_secure.server.enrol_csr import enrol_csr
from fedproxy_secure.server.renew import renew_certificate, renewable_sites
from fedproxy_secure.server.revocation import issued_serials, revoke_site
from fedproxy_secure.server.setup import server_paths
from fedproxy_secure.server.store import SQLiteStore
from fedproxy_secure.transport.pki import make_csr, new_tls_key
from fedproxy_secure.transport.renewal import RenewRequest, sign_pop
from fedproxy_secure.transport.signing import b64u
from tests.kit_net_helpers import make_kit_server
from tests.net_helpers import start_server, stop


def _tree(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_renewal_keeps_the_identity_and_the_budget_and_the_site_keeps_working(tmp_path):
    d, port, sites = make_kit_server(tmp_path, 2)
    srv = start_server(d, port)
    try:
        s0 = ClientSession(sites[0], sites[0] / "state", retry_s=10)
        cid = s0.enroll()
        s0.close()
        (sites[0] / "state" / "budget.json").write_text(json.dumps({"epsilon_spent": 1.25}))
        state_before = _tree(sites[0] / "state")
        old_pem = (sites[0] / "client.pem").read_bytes()
        old_key = (sites[0] / "client.key").read_bytes()
        assert renewable_sites(d) == ["site0"]

        r = client_renew(sites[0], sites[0] / "state", s0.key, retry_s=10)
        new_pem = (sites[0] / "client.pem").read_bytes()
        assert r["client_id"] == cid and r["name"] == "site0" and new_pem != old_pem
        assert (sites[0] / "client.key").read_bytes() == old_key  # the TLS key is kept by default
        assert _tree(sites[0] / "state") == state_before  # identity, enrolment, budget: untouched

        r2 = client_renew(sites[0], sites[0] / "state", s0.key, rotate_tls_key=True, retry_s=10)
        assert r2["rotated"] and (sites[0] / "client.key").read_bytes() != old_key
        assert not (sites[0] / "client.key.new").exists() and not (sites[0] / "client.pem.new").exists()
        assert oct((sites[0] / "client.key").stat().st_mode & 0o777) == "0o600"

        again = ClientSession(sites[0], sites[0] / "state", retry_s=10)  # mTLS with the renewed certificate
        try:
            assert again.client_id == cid and again.federation()["rounds_total"] == 1
        finally:
            again.close()
    finally:
        stop(srv)
    assert len(issued_serials(d, "site0")) == 3  # enrolment + two renewals
    events = [json.loads(x) for x in (d / "audit.jsonl").read_text().splitlines()]
    ren = [e["data"] for e in events if e["event"] == "cert_renewed"]
    assert [x["tls_key_rotated"] for x in ren] == [False, True] and all(x["client"] == cid for x in ren)
    assert verify_log(d / "audit.jsonl").ok
    rev = revoke_site(d, "site0")  # every serial ever issued goes into the CRL
    assert sorted(rev["serials"]) == issued_serials(d, "site0")


@pytest.fixture()
def enrolled(tmp_path):
    """site0 enrolled by CSR without a network: ``(d, store, audit, cid, tls key, cert pem)``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    d, _port, sites = make_kit_server(tmp_path, 1)
    store = SQLiteStore(server_paths(d)["db"])
    audit = AuditLog(server_paths(d)["audit"])
    ident = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key = new_tls_key()
    r = enrol_csr(d, store, audit, (sites[0] / "token").read_text().strip(), ident, make_csr(key, "site0"))
    yield d, store, audit, r["client_id"], key, r["cert"].encode()
    store.close()


def _req(cid, key, cert_pem, csr_key=None, name="site0") -> RenewRequest:
    csr = make_csr(csr_key or key, name)
    return RenewRequest(cert=cert_pem.decode(), csr=csr.decode(), pop=b64u(sign_pop(key, cid, cert_pem, csr)))


def test_renewal_needs_the_current_certificate_key(enrolled):
    d, store, audit, cid, key, pem = enrolled
    other = new_tls_key()
    good = _req(cid, key, pem)
    forged = RenewRequest(cert=good.cert, csr=good.csr, pop=b64u(sign_pop(other, cid, pem, good.csr.encode())))
    with pytest.raises(SecurityError, match="pop: not signed by the current certificate's key"):
        renew_certificate(d, store, audit, cid, forged)
    bound = RenewRequest(cert=good.cert, csr=good.csr, pop=b64u(sign_pop(key, "c-other", pem, good.csr.encode())))
    with pytest.raises(SecurityError, match="pop: not signed"):  # the proof is bound to the client id
        renew_certificate(d, store, audit, cid, bound)
    with pytest.raises(SecurityError, match="CN=site1|site1"):  # a CSR for another name
        renew_certificate(d, store, audit, cid, _req(cid, key, pem, name="site1"))
    assert len(issued_serials(d, "site0")) == 1  # nothing was signed
    r = renew_certificate(d, store, audit, cid, good)
    new_pem = r["cert"].encode()
    with pytest.raises(SecurityError, match="not the latest certificate"):  # the replaced one cannot renew again
        renew_certificate(d, store, audit, cid, _req(cid, key, pem))
    assert renew_certificate(d, store, audit, cid, _req(cid, key, new_pem))["client_id"] == cid


def test_an_expired_certificate_renews_only_within_the_grace_window(enrolled):
    d, store, audit, cid, key, pem = enrolled
    end = x509.load_pem_x509_certificate(pem).not_valid_after_utc
    r = renew_certificate(d, store, audit, cid, _req(cid, key, pem), now=end + _dt.timedelta(days=6))
    new_pem = r["cert"].encode()
    new_end = x509.load_pem_x509_certificate(new_pem).not_valid_after_utc
    with pytest.raises(SecurityError, match="renewal grace window"):
        renew_certificate(d, store, audit, cid, _req(cid, key, new_pem), now=new_end + _dt.timedelta(days=8))


def test_a_revoked_site_cannot_renew(enrolled):
    d, store, audit, cid, key, pem = enrolled
    revoke_site(d, "site0")
    with pytest.raises(SecurityError, match="not an active enrolled site|revoked"):
        renew_certificate(d, store, audit, cid, _req(cid, key, pem))
    assert renewable_sites(d) == []
    assert os.path.isfile(d / "pki" / "crl.pem")
