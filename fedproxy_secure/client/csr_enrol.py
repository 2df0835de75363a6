"""First join of a site made from a kit: make the site's TLS key, send a CSR with the token, install the certificate.

The TLS key is generated here and written 0600 (``client.key`` in the site folder); it never leaves the site.
The request goes to the kit's enrolment URL over TLS 1.3 that verifies the server against the kit's CA and
presents no client certificate (the site has none yet); it is signed by the site's Ed25519 identity key,
which the server registers (proof of possession). The returned certificate is installed only if it chains
to the kit's CA, is over our key and names our site.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from fedproxy_secure.artifacts.keyfiles import read_private_file, write_private_file
from fedproxy_secure.transport.http import SignedClient, expect
from fedproxy_secure.transport.pki import check_issued, load_key, make_csr, new_tls_key, private_key_pem
from fedproxy_secure.transport.signing import b64u


def needs_csr_enrolment(enrol_dir: str | os.PathLike) -> bool:
    """True for a site folder made from a kit that has no client certificate yet."""
    e = Path(enrol_dir)
    if (e / "client.pem").is_file():
        return False
    info = json.loads((e / "server.json").read_text())
    return bool(info.get("enrol_url"))


def csr_enrol(enrol_dir: str | os.PathLike, state_dir: str | os.PathLike, identity, retry_s: float = 120.0,
              log: Callable[[str], None] | None = None) -> str:
    """Enrol the site of ``enrol_dir`` with a CSR; returns its client id and writes ``state_dir/enrolment.json``.

    Guarantees: ``client.key`` is made once (0600, reused if an earlier attempt was interrupted) and is never
    sent; ``client.pem`` is written only after :func:`check_issued` accepts it. Raises SecurityError (or
    ServerUnreachable) naming the reason when the server refuses or answers with a certificate that is not ours.
    """
    from cryptography.hazmat.primitives import serialization

    e, st = Path(enrol_dir), Path(state_dir)
    info = json.loads((e / "server.json").read_text())
    name = str(info["name"])
    key_path = e / "client.key"
    if not key_path.exists():
        write_private_file(key_path, private_key_pem(new_tls_key()))
    key = load_key(key_path)  # refuses a group/world-readable key file
    token = read_private_file(e / "token").decode("utf-8").strip()
    pub = identity.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    http = SignedClient(info["enrol_url"], e / "ca.pem", None, None, identity, "enroll", retry_s=retry_s)
    try:
        r = expect(http.post_json("/v1/csr", {"token": token, "pubkey": b64u(pub),
                                              "csr": make_csr(key, name).decode()}), "CSR enrolment")
    finally:
        http.close()
    pem = str(r["cert"]).encode()
    check_issued(pem, (e / "ca.pem").read_bytes(), key, name)
    tmp = e / ".client.pem.tmp"
    tmp.write_bytes(pem)
    os.replace(tmp, e / "client.pem")
    (st / "enrolment.json").write_text(json.dumps({"client_id": r["client_id"], "name": r["name"]}))
    (log or (lambda _m: None))(f"enrolled as {r['client_id']} with a CSR (certificate serial "
                               f"{format(_serial(pem), 'x')[:16]}...)")
    return str(r["client_id"])


def _serial(pem: bytes) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem).serial_number
