"""Operator set-up: ``server init`` (CA, server certificate, operator key, store) and ``enroll``.

Server folder layout::

    DIR/pki/{ca.pem,ca.key,server.pem,server.key}   DIR/keys/{operator.key,operator.pub}
    DIR/federation.json   DIR/state.db   DIR/audit.jsonl   DIR/enrol/<site>/ (handed to the site)

An enrolment folder holds ``ca.pem``, ``client.pem``, ``client.key`` (0600), ``operator.pub``,
``token`` (one-time, 0600) and ``server.json`` (URL). The operator hands it to the site over a
trusted channel; the site's ``client join`` spends the token with its own fresh Ed25519 key.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from fedproxy_secure.artifacts.keys import generate_key, save_operator_key, save_private_key, save_public_key
from fedproxy_secure.audit.log import AuditLog
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.server.rounds import FederationSettings
from fedproxy_secure.server.store import SQLiteStore
from fedproxy_secure.transport.pki import CertPair, create_ca, issue_client_cert, issue_server_cert, write_private


def server_paths(d: str | os.PathLike) -> dict[str, Path]:
    """Every path of a server folder."""
    d = Path(d)
    return {"dir": d, "ca": d / "pki" / "ca.pem", "ca_key": d / "pki" / "ca.key", "cert": d / "pki" / "server.pem",
            "key": d / "pki" / "server.key", "op_key": d / "keys" / "operator.key", "op_pub": d / "keys" / "operator.pub",
            "settings": d / "federation.json", "db": d / "state.db", "audit": d / "audit.jsonl", "enrol": d / "enrol",
            "he_key": d / "keys" / "he_statement.key"}


def he_statement_key(d: str | os.PathLike):
    """The server's Ed25519 key for signing HE contribution statements (made on first use, 0600).

    Kept apart from the operator key (one key, one purpose); its public key goes into every
    operator-signed HE round config, and a restart reuses it so stored rounds replay identically.
    """
    from fedproxy_secure.artifacts.keys import load_private_key

    p = server_paths(d)["he_key"]
    if not p.exists():
        save_private_key(generate_key(), p)
    return load_private_key(p)


def init_server(d: str | os.PathLike, settings: FederationSettings,
                hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict[str, Path]:
    """Create CA, server certificate, operator key, settings, store and audit log in ``d``."""
    p = server_paths(d)
    if p["ca_key"].exists():
        raise ConfigError(f"{p['dir']} is already initialised (found {p['ca_key']}); use another --dir")
    settings.validate()
    for sub in ("pki", "keys", "enrol"):
        (p["dir"] / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(p["dir"] / "pki", 0o700)
    os.chmod(p["dir"] / "keys", 0o700)
    ca = create_ca(p["dir"] / "pki")
    issue_server_cert(ca, p["dir"] / "pki", hosts)
    key = generate_key()
    save_operator_key(key, p["op_key"])  # encrypted with FEDPROXY_OPERATOR_PASSPHRASE when set
    save_public_key(key.public_key(), p["op_pub"])
    p["settings"].write_text(json.dumps(asdict(settings), indent=2))
    SQLiteStore(p["db"]).close()
    AuditLog(p["audit"]).append("server_init", {"hosts": list(hosts), "settings": asdict(settings)})
    return p


def load_settings(d: str | os.PathLike) -> FederationSettings:
    """The federation settings of a server folder."""
    p = server_paths(d)["settings"]
    try:
        return FederationSettings.from_dict(json.loads(p.read_text()))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {p}: {exc}; run 'fedproxy-secure server init' first") from None


def enroll_site(d: str | os.PathLike, name: str, server_url: str, ttl_s: float = 7 * 86400) -> Path:
    """Issue a one-time token and a client certificate for site ``name``; returns the bundle folder."""
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '-', '_' or '.'")
    p = server_paths(d)
    out = p["enrol"] / name
    if out.exists():
        raise ConfigError(f"{out} exists: site {name!r} was already issued an enrolment bundle")
    store = SQLiteStore(p["db"])
    try:
        token = store.add_token(name, ttl_s)
    finally:
        store.close()
    out.mkdir(parents=True)
    os.chmod(out, 0o700)
    issue_client_cert(CertPair(p["ca"], p["ca_key"]), name, out)
    (out / "ca.pem").write_bytes(p["ca"].read_bytes())
    (out / "operator.pub").write_bytes(p["op_pub"].read_bytes())
    write_private(out / "token", token.encode())
    (out / "server.json").write_text(json.dumps({"url": server_url, "name": name, "issued_at": int(time.time())}))
    AuditLog(p["audit"]).append("enrol_issue", {"name": name, "token_id": token.split(".")[0]})
    return out
