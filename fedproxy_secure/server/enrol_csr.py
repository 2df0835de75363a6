"""CSR enrolment of a site from its kit: the enrolment listener and what it checks before it signs.

Why a second listener: the federation port keeps ``CERT_REQUIRED`` at the TLS handshake, so nothing
without a CA-issued (and not revoked) client certificate reaches any of its routes. A site that has
only its kit has no certificate yet; it enrols on a separate port (default: the federation port + 1)
whose TLS authenticates the server only and whose app has exactly one route, ``POST /v1/csr`` (16 KiB
body limit). Making the main port ``CERT_OPTIONAL`` instead would let certificate-less peers reach
every route, guarded only by the per-route checks (uvicorn does not hand the peer certificate to the
app). The listener runs only while some kit is unspent.

``POST /v1/csr`` body ``{token, pubkey, csr}``, signed (``transport.signing``) by the Ed25519 identity key
``pubkey`` (proof of possession; the signature covers the CSR). The server checks, in order: the
signature, the token (constant-time, unused, unexpired, issued with a CSR kit), that the site is not
revoked, the CSR (:func:`~fedproxy_secure.transport.pki.check_csr`: self-signature, P-256, subject
exactly the token's site name), then signs a short-lived client certificate (reading the CA key only
now), spends the token atomically and records the serial. The site's private keys never leave it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fedproxy_secure.auditlog import AuditLog
from fedproxy_secure.errors import ConfigError, ProtocolAbort, SecurityError
from fedproxy_secure.server.app import BodyLimit, parse_json
from fedproxy_secure.server.renew import renew_certificate
from fedproxy_secure.server.revocation import load_revoked, record_issued, revocation_aware_lookup
from fedproxy_secure.server.setup import server_paths
from fedproxy_secure.server.store import SQLiteStore, Storage
from fedproxy_secure.transport.pki import CLIENT_CERT_DAYS, CertPair, check_csr, sign_csr
from fedproxy_secure.transport.renewal import RENEW_PATH, RenewRequest
from fedproxy_secure.transport.signing import RequestVerifier, b64u_decode

CSR_PATH = "/v1/csr"
CSR_MAX_BODY = 16 << 10


def kit_record(d: str | os.PathLike, name: str) -> dict | None:
    """``DIR/kits/NAME.json`` (what ``server enroll`` recorded for the site's kit), or None."""
    p = server_paths(d)["kits"] / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def pending_kits(d: str | os.PathLike) -> list[str]:
    """Sites with a CSR kit that have not enrolled yet and are not revoked (the listener serves them)."""
    p = server_paths(d)
    if not p["kits"].is_dir():
        return []
    store = SQLiteStore(p["db"])
    try:
        enrolled = {c["name"] for c in store.clients()}
    finally:
        store.close()
    revoked = set(load_revoked(d))
    out = []
    for f in sorted(p["kits"].glob("*.json")):
        rec = json.loads(f.read_text())
        if rec.get("enrol") == "csr" and rec["site"] not in enrolled and rec["site"] not in revoked:
            out.append(rec["site"])
    return out


def enrol_csr(d: str | os.PathLike, store: Storage, audit: AuditLog, token: str, pubkey: bytes, csr_pem: bytes) -> dict:
    """Check and sign a site's CSR; returns ``{"client_id", "name", "cert"}`` (cert: PEM text).

    Raises SecurityError naming the reason for an invalid/used/expired token, a revoked site, a token not
    issued with a CSR kit, or a CSR that fails :func:`check_csr`; ConfigError when the CA key is offline.
    The token is spent only when everything checked out and the certificate is signed.
    """
    from cryptography.hazmat.primitives import serialization

    try:
        name = store.token_site(token)
    except SecurityError as exc:
        if "already used" not in str(exc):
            raise
        return _repeat(d, store, token, pubkey, csr_pem, exc)
    if name in load_revoked(d):
        raise SecurityError(f"site {name!r} is revoked; refused")
    rec = kit_record(d, name)
    if rec is None or rec.get("enrol") != "csr":
        raise SecurityError(f"site {name!r} was not issued a CSR kit; use its enrolment folder instead")
    csr = check_csr(csr_pem, name)
    p = server_paths(d)
    cert = sign_csr(CertPair(p["ca"], p["ca_key"]), csr, name, int(rec.get("cert_days", CLIENT_CERT_DAYS)))
    cid, got = store.enroll(token, pubkey)  # atomic: a concurrent second use of the token fails here
    pem = cert.public_bytes(serialization.Encoding.PEM)
    record_issued(d, got, cid, cert.serial_number, cert.not_valid_after_utc.timestamp(), hashlib.sha256(pem).hexdigest())
    (Path(d) / "pki" / "issued" / f"{got}.pem").write_bytes(pem)  # public: the same site may fetch it again
    audit.append("enrol_csr", {"client": cid, "name": got, "serial": str(cert.serial_number),
                               "not_after": int(cert.not_valid_after_utc.timestamp()),
                               "pubkey_sha256": hashlib.sha256(pubkey).hexdigest()})
    return {"client_id": cid, "name": got, "cert": pem.decode()}


def _repeat(d, store: Storage, token: str, pubkey: bytes, csr_pem: bytes, refusal: SecurityError) -> dict:
    """A repeated enrolment whose reply was lost: the same site (same identity key, proven by the request
    signature, and same TLS key, proven by the CSR) gets its certificate again; anyone else gets ``refusal``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    name = store.token_site(token, allow_used=True)
    issued = Path(d) / "pki" / "issued"
    rec_p, pem_p = issued / f"{name}.json", issued / f"{name}.pem"
    if name in load_revoked(d) or not rec_p.is_file() or not pem_p.is_file():
        raise refusal
    rec = json.loads(rec_p.read_text())
    key = store.client_key(rec["client_id"])
    if key is None or not hmac.compare_digest(key, pubkey):
        raise refusal
    csr = check_csr(csr_pem, name)
    pem = pem_p.read_bytes()
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if x509.load_pem_x509_certificate(pem).public_key().public_bytes(*der) != csr.public_key().public_bytes(*der):
        raise refusal
    return {"client_id": rec["client_id"], "name": name, "cert": pem.decode()}


def create_enrol_app(d: str | os.PathLike, store: Storage, audit: AuditLog, skew_s: int = 120) -> BodyLimit:
    """The enrolment listener's ASGI app: ``POST /v1/csr`` (first enrolment from a kit) and ``POST /v1/renew``
    (certificate renewal of an enrolled site, ``server/renew.py``) only; bodies over 16 KiB refused unread."""
    d = Path(d)
    app = FastAPI(title="fedproxy-secure enrolment", docs_url=None, redoc_url=None, openapi_url=None)

    def refuse(status: int, reason: str) -> JSONResponse:
        audit.append("reject", {"method": "POST", "path": CSR_PATH, "status": status, "reason": reason[:300],
                                "client": None})
        return JSONResponse({"error": reason}, status_code=status)

    @app.post(CSR_PATH)
    async def csr(request: Request):
        body = await request.body()
        try:
            msg = parse_json(body)
            if not isinstance(msg, dict) or set(msg) != {"token", "pubkey", "csr"}:
                raise ProtocolAbort("body must be {token, pubkey, csr}")
            pub = b64u_decode(str(msg["pubkey"]))
        except (ProtocolAbort, ValueError) as exc:
            return refuse(400, str(exc))
        pop = RequestVerifier(lambda _cid: pub, store, skew_s)
        try:
            await run_in_threadpool(pop.verify, request.method, request.url.path, body, request.headers)
            return await run_in_threadpool(enrol_csr, d, store, audit, str(msg["token"]), pub,
                                           str(msg["csr"]).encode())
        except SecurityError as exc:
            return refuse(403, str(exc))
        except ConfigError as exc:
            return refuse(503, str(exc))

    renew_verifier = RequestVerifier(revocation_aware_lookup(d, store.client_key), store, skew_s)

    @app.post(RENEW_PATH)
    async def renew(request: Request):
        body = await request.body()
        try:  # the identity signature first: nothing of the body is parsed before it verifies
            who = await run_in_threadpool(renew_verifier.verify, request.method, request.url.path, body,
                                          request.headers)
        except SecurityError as exc:
            return refuse(401, str(exc))
        try:
            req = RenewRequest.model_validate(parse_json(body))
        except (ProtocolAbort, ValueError) as exc:
            return refuse(400, f"renewal body: {exc}"[:300])
        try:
            return await run_in_threadpool(renew_certificate, d, store, audit, who.client_id, req)
        except SecurityError as exc:
            return refuse(403, str(exc))
        except ConfigError as exc:
            return refuse(503, str(exc))

    return BodyLimit(app, CSR_MAX_BODY)
