"""Certificate renewal for an enrolled site (``client renew``): same identity, same site name, new certificate.

Served on the enrolment listener (``server/enrol_csr.py``) as ``POST /v1/renew`` (request format:
:mod:`fedproxy_secure.transport.renewal`). The route verifies the request signature against the site's
enrolled, not revoked Ed25519 identity key before it parses the body; :func:`renew_certificate` then checks,
in order: the site is not revoked; the presented certificate is the latest one issued to this site
(SHA-256 compared in constant time with ``pki/issued/NAME.json``), chains to the CA, names the site and is
valid now or expired at most ``grace_days`` ago; the ``pop`` signature by that certificate's key; the CSR
(:func:`~fedproxy_secure.transport.pki.check_csr`: self-signature, P-256, subject exactly the site name).
Only then is the CA key read and a certificate signed for the kit's lifetime (``cert_days``). The serial
joins the site's list of issued serials (a later revocation puts every one in the CRL) and
``cert_renewed`` is audited. The client id, the identity key and the enrolment row do not change.
The previous certificate stays valid until its own ``not_after`` unless the site is revoked.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
from pathlib import Path

from fedproxy_secure.auditlog import AuditLog
from fedproxy_secure.errors import SecurityError
from fedproxy_secure.server.revocation import load_revoked, record_issued, revocation_paths
from fedproxy_secure.server.setup import server_paths
from fedproxy_secure.server.store import Storage
from fedproxy_secure.transport.pki import CLIENT_CERT_DAYS, CertPair, check_csr, sign_csr
from fedproxy_secure.transport.renewal import RENEW_GRACE_DAYS, RenewRequest, verify_pop
from fedproxy_secure.transport.signing import b64u_decode


def renewable_sites(d: str | os.PathLike) -> list[str]:
    """Sites with a certificate issued from a CSR and not revoked (the enrolment listener serves their renewal)."""
    issued = revocation_paths(d)["issued"]
    revoked = set(load_revoked(d))
    return sorted(f.stem for f in issued.glob("*.json") if f.stem not in revoked) if issued.is_dir() else []


def renew_certificate(d: str | os.PathLike, store: Storage, audit: AuditLog, client_id: str, req: RenewRequest,
                      grace_days: float = RENEW_GRACE_DAYS, now: _dt.datetime | None = None) -> dict:
    """Sign a new certificate for the enrolled site ``client_id`` (whose request signature the caller verified);
    returns ``{"client_id", "name", "cert"}`` (cert: PEM text). SecurityError naming the reason for every
    refusal; ConfigError when the CA key is offline. Nothing is written unless a certificate is signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    now = now or _dt.datetime.now(_dt.timezone.utc)
    names = {c["client_id"]: (c["name"], c["status"]) for c in store.clients()}
    if client_id not in names or names[client_id][1] != "active":
        raise SecurityError(f"client {client_id!r} is not an active enrolled site; refused")
    name = names[client_id][0]
    if name in load_revoked(d):
        raise SecurityError(f"site {name!r} is revoked; refused")
    rec_p = revocation_paths(d)["issued"] / f"{name}.json"
    if not rec_p.is_file():
        raise SecurityError(f"site {name!r} has no certificate issued from a CSR here; enrol it with a site kit")
    rec = json.loads(rec_p.read_text())
    cert_pem = req.cert.encode()
    if rec.get("client_id") != client_id or not hmac.compare_digest(
            str(rec.get("cert_sha256", "")), hashlib.sha256(cert_pem).hexdigest()):
        raise SecurityError("cert: not the latest certificate issued to this site; renew with the installed "
                            "client.pem")
    p = server_paths(d)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(p["ca"].read_bytes()))
    except Exception:  # noqa: BLE001 (any parse or signature failure is a refusal)
        raise SecurityError("cert: does not verify against this server's CA; refused") from None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns or cns[0].value != name:
        raise SecurityError(f"cert: names {cert.subject.rfc4514_string()!r}, not {name!r}; refused")
    if now > cert.not_valid_after_utc + _dt.timedelta(days=grace_days):
        raise SecurityError(f"cert: expired on {cert.not_valid_after_utc:%Y-%m-%d}, more than {grace_days:g} days "
                            "ago (the renewal grace window); ask the operator for a new site kit")
    if now < cert.not_valid_before_utc:
        raise SecurityError("cert: not valid yet; check the site's clock")
    try:
        sig = b64u_decode(req.pop)
    except ValueError:
        raise SecurityError("pop: not base64url") from None
    verify_pop(cert, client_id, cert_pem, req.csr.encode(), sig)
    csr = check_csr(req.csr.encode(), name)
    kit_p = p["kits"] / f"{name}.json"
    kit = json.loads(kit_p.read_text()) if kit_p.is_file() else {}
    new = sign_csr(CertPair(p["ca"], p["ca_key"]), csr, name, int(kit.get("cert_days", CLIENT_CERT_DAYS)))
    pem = new.public_bytes(serialization.Encoding.PEM)
    record_issued(d, name, client_id, new.serial_number, new.not_valid_after_utc.timestamp(),
                  hashlib.sha256(pem).hexdigest())
    tmp = rec_p.with_name(f".{name}.pem.tmp")
    tmp.write_bytes(pem)
    os.replace(tmp, Path(rec_p).with_suffix(".pem"))
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    audit.append("cert_renewed", {"client": client_id, "name": name, "old_serial": str(cert.serial_number),
                                  "serial": str(new.serial_number), "not_after": int(new.not_valid_after_utc.timestamp()),
                                  "tls_key_rotated": csr.public_key().public_bytes(*der)
                                  != cert.public_key().public_bytes(*der)})
    return {"client_id": client_id, "name": name, "cert": pem.decode()}
