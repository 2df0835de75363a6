"""``client renew``: a new client certificate for the same site identity; the privacy budget stays where it is.

The site signs the request with its Ed25519 identity key (``state_dir/identity.key``) under its client id
(``state_dir/enrolment.json``) and proves possession of its current certificate key (``client.key``) by
signing the CSR, the certificate and the client id with it (:mod:`fedproxy_secure.transport.renewal`). It goes
to the kit's enrolment URL over TLS 1.3 that verifies the server against the kit's CA, with no client
certificate, so a certificate that expired within the server's grace window (7 days by default) still renews.
The returned certificate is installed only if it chains to the kit's CA, is over the requested key and names
the site. Nothing in ``state_dir`` changes: the identity key, the client id, ``budget.json`` (ε spent so
far), the evidence and the round state stay as they are.

``rotate_tls_key``: a new P-256 TLS key is made (``client.key.new``, 0600) and the certificate is issued for it;
the new key and certificate replace the old ones only after the check (an interrupted install is finished
by the next ``client renew``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from fedproxy_secure.artifacts.keyfiles import write_private_file
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.transport.http import SignedClient, expect
from fedproxy_secure.transport.pki import check_issued, load_key, make_csr, new_tls_key, private_key_pem
from fedproxy_secure.transport.renewal import RENEW_PATH, sign_pop
from fedproxy_secure.transport.signing import b64u


def _finish_pending(e: Path) -> bool:
    """Install a rotated key and certificate left by an interrupted renewal (``client.key.new`` +
    ``client.pem.new`` that match); True if it did."""
    kn, cn = e / "client.key.new", e / "client.pem.new"
    if not (kn.is_file() and cn.is_file()):
        return False
    from cryptography import x509

    key = load_key(kn)
    if x509.load_pem_x509_certificate(cn.read_bytes()).public_key().public_numbers() != key.public_key().public_numbers():
        return False
    os.replace(kn, e / "client.key")
    os.replace(cn, e / "client.pem")
    return True


def renew_certificate(enrol_dir: str | os.PathLike, state_dir: str | os.PathLike, identity,
                      rotate_tls_key: bool = False, retry_s: float = 60.0,
                      log: Callable[[str], None] | None = None) -> dict:
    """Renew the client certificate of the site in ``enrol_dir``; returns ``{"client_id", "name", "serial",
    "not_after", "rotated"}``. ConfigError naming the file when the site has not enrolled with a kit yet;
    SecurityError (or ServerUnreachable) naming the reason when the server refuses or answers with a
    certificate that is not ours. ``state_dir`` is only read."""
    e, st = Path(enrol_dir), Path(state_dir)
    say = log or (lambda _m: None)
    if _finish_pending(e):
        say("finished installing the key and certificate of an interrupted renewal")
    info = json.loads((e / "server.json").read_text())
    if not info.get("enrol_url"):
        raise ConfigError(f"{e / 'server.json'}: no enrol_url; only a site enrolled from a site kit can renew "
                          "(a legacy handover folder needs a new kit from the operator)")
    for f in (e / "client.pem", e / "client.key", st / "enrolment.json"):
        if not f.is_file():
            raise ConfigError(f"{f} is missing: the site has not enrolled yet; run 'client join' first")
    client_id = str(json.loads((st / "enrolment.json").read_text())["client_id"])
    name = str(info["name"])
    old_key, cert_pem = load_key(e / "client.key"), (e / "client.pem").read_bytes()
    if rotate_tls_key:
        new_p = e / "client.key.new"
        new_p.unlink(missing_ok=True)
        write_private_file(new_p, private_key_pem(new_tls_key()))
        key = load_key(new_p)
    else:
        key = old_key
    csr = make_csr(key, name)
    http = SignedClient(info["enrol_url"], e / "ca.pem", None, None, identity, client_id, retry_s=retry_s)
    try:
        r = expect(http.post_json(RENEW_PATH, {"cert": cert_pem.decode(), "csr": csr.decode(),
                                               "pop": b64u(sign_pop(old_key, client_id, cert_pem, csr))}),
                   "certificate renewal")
    finally:
        http.close()
    pem = str(r["cert"]).encode()
    cert = check_issued(pem, (e / "ca.pem").read_bytes(), key, name)
    if str(r.get("client_id")) != client_id:
        from fedproxy_secure.errors import SecurityError

        raise SecurityError(f"the server renewed client {r.get('client_id')!r}, not {client_id!r}; refused")
    tmp = e / ".client.pem.tmp"
    tmp.write_bytes(pem)
    if rotate_tls_key:
        os.replace(tmp, e / "client.pem.new")
        _finish_pending(e)
    else:
        os.replace(tmp, e / "client.pem")
    say(f"renewed the certificate of {client_id} ({name}): serial {format(cert.serial_number, 'x')[:16]}..., "
        f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC" + ("; new TLS key" if rotate_tls_key else ""))
    return {"client_id": client_id, "name": name, "serial": str(cert.serial_number),
            "not_after": cert.not_valid_after_utc.timestamp(), "rotated": rotate_tls_key}


def cert_expiry(enrol_dir: str | os.PathLike) -> float | None:
    """``not_after`` (epoch seconds) of the installed client certificate, or None without one."""
    from cryptography import x509

    p = Path(enrol_dir) / "client.pem"
    return x509.load_pem_x509_certificate(p.read_bytes()).not_valid_after_utc.timestamp() if p.is_file() else None
