"""Operator set-up: ``server init`` (CA, server certificate, operator key, store) and ``enroll``.

Server folder layout (documented, with its read-only readers, in :mod:`fedproxy_secure.server.folder`)::

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
from fedproxy_secure.auditlog import AuditLog, create_audit_secret
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.server.folder import read_settings, server_paths  # the folder's layout: server/folder.py
from fedproxy_secure.server.rounds import FederationSettings
from fedproxy_secure.server.store import SQLiteStore
from fedproxy_secure.transport.pki import CertPair, create_ca, issue_client_cert, issue_server_cert, write_private


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
    create_audit_secret(p["dir"])  # keys/audit.secret: the audit log is HMAC-chained from its first entry
    AuditLog(p["audit"]).append("server_init", {"hosts": list(hosts), "settings": asdict(settings)})
    return p


def load_settings(d: str | os.PathLike) -> FederationSettings:
    """The federation settings of a server folder, with a fixed A seed.

    A folder made before the A seed was stored (``a_seed: null``) gets one now, written back to
    ``federation.json`` before it is returned, so every round of the federation signs the same seed.
    """
    p = server_paths(d)["settings"]
    s = read_settings(d)  # the one reader of federation.json
    if s.a_seed is None:
        s.a_seed = new_a_seed()
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(s), indent=2))
        os.replace(tmp, p)
    return s


def new_a_seed() -> int:
    """A fresh FFA-LoRA A seed (62 random bits), fixed for the federation's life once stored."""
    import secrets

    return secrets.randbits(62)


def deployment(d: str | os.PathLike) -> dict:
    """``deployment.json`` of a folder made with ``server init --bundle`` (URL, bundle id, LoRA size),
    or ``{}`` for a folder made without a bundle."""
    p = server_paths(d)["deployment"]
    return json.loads(p.read_text()) if p.is_file() else {}


def lora_dim_of_bundle(bundle: str | os.PathLike, keyset, lora_cfg, a_seed: int) -> tuple[int, dict]:
    """Verify ``bundle`` against ``keyset``, load its proxy and count its trainable LoRA values.

    Returns ``(dim, info)``: ``dim`` is exactly the length of the vector every site trains (the
    same :func:`fedproxy_secure.lora.attach_lora` call with the same LoRA config and A seed), so a
    federation made from the bundle cannot carry another size. Raises SecurityError if the bundle
    does not verify, ModelError if the LoRA targets do not exist in the proxy.
    """
    import tempfile

    from fedproxy_secure.artifacts import load_verified_proxy
    from fedproxy_secure.lora import attach_lora, get_lora_vector, lora_names

    with tempfile.TemporaryDirectory(prefix="fedproxy-init-state-") as state:
        loaded = load_verified_proxy(bundle, keyset, state)
    model, _tok = loaded
    pm = attach_lora(model, lora_cfg, a_seed)
    vb = loaded.bundle
    info = {"bundle_id": vb.bundle_id, "bundle_version": vb.version, "bundle_key_id": vb.signer.key_id,
            "keyset_name": vb.keyset_name, "lora_tensors": len(lora_names(pm)),
            "proxy_params": int(sum(p.numel() for p in model.parameters()))}
    return int(get_lora_vector(pm).size), info


def init_from_bundle(d: str | os.PathLike, fed, bundle: str | os.PathLike, keyset_path: str | os.PathLike) -> dict:
    """``server init --bundle --keyset --config``: a federation whose LoRA size and A seed come from the bundle.

    ``fed`` is a validated :class:`~fedproxy_secure.server.fed_config.FederationFile`. Verifies the
    bundle against the operator's keyset, derives ``dim`` from the proxy and draws the A seed, then
    creates the server folder (:func:`init_server`), copies the bundle to ``DIR/bundle`` (what
    ``server start`` publishes; re-verified after the copy, same bundle id required) and the keyset to
    ``DIR/keys/keyset.json`` (what every site kit pins), and writes ``DIR/deployment.json``.
    Returns the deployment record. Nothing is created if the bundle or the config is refused.
    """
    import shutil

    from fedproxy_secure.artifacts import load_keyset, verify_bundle

    p = server_paths(d)
    if p["ca_key"].exists() or p["settings"].exists():
        raise ConfigError(f"{p['dir']} is already initialised; use another --dir")
    keyset = load_keyset(keyset_path)
    a_seed = new_a_seed()
    dim, info = lora_dim_of_bundle(bundle, keyset, fed.lora, a_seed)
    settings = fed.to_settings(dim, a_seed)
    init_server(d, settings, fed.server_hosts())
    shutil.copytree(bundle, p["bundle"])
    copied = verify_bundle(p["bundle"], keyset)
    if copied.bundle_id != info["bundle_id"]:
        raise ConfigError(f"{bundle} changed while 'server init' copied it; run init again in a new --dir")
    shutil.copy(keyset_path, p["keyset"])
    rec = {"url": fed.url, "hosts": list(fed.server_hosts()), "port": fed.port(), "lora_dim": dim,
           "lora": fed.lora.model_dump(mode="json"), **info}
    p["deployment"].write_text(json.dumps(rec, indent=2))
    AuditLog(p["audit"]).append("server_init_bundle", {k: v for k, v in rec.items() if k != "hosts"})
    return rec


def check_site_name(name: str) -> str:
    """``name`` if it is a valid site name (letters, digits, ``-_.``, not only dots), else ConfigError."""
    if not name or set(name) <= {"."} or not all(ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in name):
        raise ConfigError(f"site name {name!r}: use letters, digits, '-', '_' or '.'")
    return name


def enroll_site(d: str | os.PathLike, name: str, server_url: str, ttl_s: float = 7 * 86400) -> Path:
    """Issue a one-time token and a client certificate for site ``name``; returns the bundle folder."""
    check_site_name(name)
    p = server_paths(d)
    out = p["enrol"] / name
    if out.exists():
        raise ConfigError(f"{out} exists: site {name!r} was already issued an enrolment bundle")
    from fedproxy_secure.server.revocation import load_revoked

    if name in load_revoked(d):
        raise ConfigError(f"site {name!r} was revoked here (see pki/revoked.json); enrol the site under another name")
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
