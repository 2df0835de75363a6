"""Who is calling: the site name of the connection's client certificate, and whether it may use the model now.

The TLS layer has already required a client certificate signed by the federation CA at the handshake
(and refused those in ``pki/crl.pem``). Here each request is bound to the certificate's site name
(its single CN) and checked against the federation's store and revocation records, on every request,
so a revocation applies at once, also on connections that are already open.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from fedproxy_secure.serving.errors import HTTPError

#: key of the peer certificate in the ASGI scope (ASGI TLS extension: ``extensions["tls"]["client_cert_chain"]``)
TLS_EXT = "tls"


def site_of_certificate(der: bytes) -> tuple[str, int]:
    """``(site name, serial)`` of a DER client certificate: its single common name and serial number.

    The TLS layer has already checked that the federation CA signed it; this only reads who it names.
    ValueError when it has no or several common names.
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str) or not cns[0].value:
        raise ValueError("client certificate must carry exactly one common name (the site name)")
    return cns[0].value, int(cert.serial_number)


def peer_site(scope: dict) -> tuple[str, int]:
    """``(site, serial)`` of the client certificate of this connection; 403 when there is none."""
    import ssl

    chain = (scope.get("extensions") or {}).get(TLS_EXT, {}).get("client_cert_chain") or []
    if not chain:
        raise HTTPError(403, "no client certificate on this connection; use your site's certificate",
                        kind="permission_error")
    try:
        return site_of_certificate(ssl.PEM_cert_to_DER_cert(chain[0]))
    except ValueError as exc:
        raise HTTPError(403, f"client certificate refused: {exc}", kind="permission_error") from None


def site_status(db: Path, site: str) -> str | None:
    """The enrolment status of ``site`` in the store at ``db`` (``active``, ``revoked``, ...), None if unknown."""
    from fedproxy_secure.server.store import SQLiteStore

    store = SQLiteStore(db)
    try:
        return next((c["status"] for c in store.clients() if c["name"] == site), None)
    finally:
        store.close()


def revocation_check(server_dir: str | os.PathLike) -> Callable[[str, int], Optional[str]]:
    """``check(site, serial) -> reason | None`` over the server folder's revocation records (re-read each call).

    Refuses a certificate whose serial ``server revoke-site`` listed in ``pki/revoked.json``, any
    certificate of a revoked site, and, when ``pki/issued/SITE.json`` records the certificate
    signed at the site's CSR enrolment, any other certificate carrying that site's name.
    """
    from fedproxy_secure.server.revocation import load_revoked, revocation_paths

    issued_dir = revocation_paths(server_dir)["issued"]

    def check(site: str, serial: int) -> Optional[str]:
        revoked = load_revoked(server_dir)
        if site in revoked or any(str(serial) in v.get("serials", []) for v in revoked.values()):
            return f"site {site!r} (certificate serial {serial}) was revoked by the operator"
        rec = issued_dir / f"{site}.json"
        if rec.is_file() and str(json.loads(rec.read_text()).get("serial")) != str(serial):
            return f"certificate serial {serial} is not the one issued to site {site!r} at enrolment"
        return None

    return check


def refusal(db: Path, site: str, serial: int, access: Callable[[str, int], Optional[str]] | None) -> str | None:
    """Why ``site`` (certificate ``serial``) may not use the model now, or None when it may."""
    status = site_status(db, site)
    if status is None:
        return f"site {site!r} is not enrolled in this federation"
    if status != "active":
        return f"site {site!r} is {status} in this federation; ask the operator"
    return access(site, serial) if access is not None else None
