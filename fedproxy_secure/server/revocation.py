"""Site revocation (``server revoke-site NAME``): the revocation list, the CRL and the key lookup that honours them.

``DIR/pki/revoked.json`` lists each revoked site with its client id and the serials of the client
certificates issued to it (``DIR/pki/issued/NAME.json``, written at CSR enrolment). Revoking a site:

- marks its enrolment revoked in the store, so its Ed25519 identity key no longer verifies any signed
  request; :func:`revocation_aware_lookup` makes the refusal name the revocation (clear reason, 401);
- rewrites ``DIR/pki/crl.pem``, signed by the CA, which ``server start`` loads so the site's certificate
  is refused at the TLS handshake (needs the CA key at revocation time; without it the identity
  revocation still applies and the CRL is written at the next revocation made with the key);
- is audited (``site_revoked``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from pathlib import Path
from typing import Callable

from fedproxy_secure.auditlog import AuditLog
from fedproxy_secure.errors import ConfigError, SecurityError
from fedproxy_secure.server.setup import check_site_name, server_paths
from fedproxy_secure.server.store import SQLiteStore
from fedproxy_secure.transport.pki import CertPair, write_crl


def revocation_paths(d: str | os.PathLike) -> dict[str, Path]:
    """The revocation list, CRL and issued-certificate folder of server folder ``d``."""
    pki = Path(d) / "pki"
    return {"revoked": pki / "revoked.json", "crl": pki / "crl.pem", "issued": pki / "issued"}


def load_revoked(d: str | os.PathLike) -> dict[str, dict]:
    """Revoked sites by name (``{}`` when none was ever revoked)."""
    p = revocation_paths(d)["revoked"]
    return json.loads(p.read_text())["sites"] if p.is_file() else {}


def record_issued(d: str | os.PathLike, name: str, client_id: str, serial: int, not_after: float,
                  cert_sha256: str) -> None:
    """Record the client certificate issued to site ``name`` (public data only).

    ``serial`` is the latest certificate; ``serials`` every serial ever issued to the site (enrolment and each
    renewal), so a revocation lists all of them in the CRL, including an older one that has not expired yet.
    """
    folder = revocation_paths(d)["issued"]
    folder.mkdir(parents=True, exist_ok=True)
    rec = folder / f"{name}.json"
    prev = issued_serials(d, name)
    (folder / f"{name}.json.tmp").write_text(json.dumps({
        "site": name, "client_id": client_id, "serial": str(serial), "serials": sorted(set(prev) | {str(serial)}),
        "not_after": not_after, "cert_sha256": cert_sha256}))
    os.replace(folder / f"{name}.json.tmp", rec)


def issued_serials(d: str | os.PathLike, name: str) -> list[str]:
    """Every certificate serial recorded as issued to site ``name`` (``[]`` when none)."""
    rec = revocation_paths(d)["issued"] / f"{name}.json"
    if not rec.is_file():
        return []
    r = json.loads(rec.read_text())
    return sorted({str(r["serial"]), *map(str, r.get("serials", []))})


def revoke_site(d: str | os.PathLike, name: str, reason: str = "revoked by the operator",
                ca_key: str | os.PathLike | None = None) -> dict:
    """Revoke site ``name`` of server folder ``d``; returns ``{"name", "client_id", "serials", "crl"}``.

    Guarantees: from the moment this returns, every signed request by the site's identity key is refused by a
    running server (the store is shared); the CRL (when the CA key is at ``ca_key``, default ``DIR/pki/ca.key``)
    lists every certificate serial issued to a revoked site, and a restarted server refuses them at the
    handshake. Idempotent. ConfigError when ``name`` was never enrolled nor issued a kit.
    """
    check_site_name(name)
    p, rp = server_paths(d), revocation_paths(d)
    store = SQLiteStore(p["db"])
    try:
        cid = store.revoke_client(name)
    finally:
        store.close()
    serials = issued_serials(d, name)
    legacy = p["enrol"] / name / "client.pem"  # a handover folder ('server enroll' without --out) still here
    if legacy.is_file():
        from fedproxy_secure.transport.pki import load_cert

        serials.append(str(load_cert(legacy).serial_number))
    if (cid is None and not serials and not (p["kits"] / f"{name}.json").is_file() and not (p["enrol"] / name).is_dir()
            and name not in load_revoked(d)):
        raise ConfigError(f"NAME: site {name!r} was never enrolled here; see 'server status' for the site names")
    sites = load_revoked(d)
    now = time.time()
    prev = sites.get(name, {})
    sites[name] = {**prev, "client_id": cid or prev.get("client_id"), "serials": sorted(set(prev.get("serials", [])) | set(serials)),
                   "revoked_at": prev.get("revoked_at", now), "reason": reason[:200]}
    tmp = rp["revoked"].with_name(".revoked.json.tmp")
    tmp.write_text(json.dumps({"sites": sites}, indent=2))
    os.replace(tmp, rp["revoked"])
    key = Path(ca_key) if ca_key else p["ca_key"]
    crl = None
    if key.is_file():
        entries = [(int(s), _dt.datetime.fromtimestamp(v["revoked_at"], _dt.timezone.utc))
                   for v in sites.values() for s in v["serials"]]
        crl = write_crl(CertPair(p["ca"], key), entries, rp["crl"])
    AuditLog(p["audit"]).append("site_revoked", {"name": name, "client_id": cid, "serials": serials,
                                                 "reason": reason[:200], "crl_updated": crl is not None})
    return {"name": name, "client_id": cid, "serials": serials, "crl": crl}


def mark_forgotten(d: str | os.PathLike, name: str, when: float) -> None:
    """Note in the revocation list that site ``name`` was forgotten (``server forget-site``); the entry itself
    (client id, serials) stays, so the certificate stays refused and the name is not issued again."""
    rp = revocation_paths(d)
    sites = load_revoked(d)
    if name not in sites:
        raise ConfigError(f"site {name!r} is not revoked; 'server forget-site' revokes a site before it forgets it")
    sites[name]["forgotten_at"] = sites[name].get("forgotten_at", when)
    tmp = rp["revoked"].with_name(".revoked.json.tmp")
    tmp.write_text(json.dumps({"sites": sites}, indent=2))
    os.replace(tmp, rp["revoked"])


def revocation_aware_lookup(d: str | os.PathLike, lookup: Callable[[str], bytes | None]) -> Callable[[str], bytes | None]:
    """``lookup`` (client id -> Ed25519 key) that raises SecurityError naming the revocation for a revoked client.

    The revocation list is re-read when its file changes, so a running server honours ``revoke-site`` at once.
    """
    path = revocation_paths(d)["revoked"]
    cache: dict = {"mtime": None, "by_client": {}}

    def wrapped(client_id: str) -> bytes | None:
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime != cache["mtime"]:
            sites = load_revoked(d) if mtime is not None else {}
            cache["by_client"] = {v["client_id"]: (n, v) for n, v in sites.items() if v.get("client_id")}
            cache["mtime"] = mtime
        hit = cache["by_client"].get(client_id)
        if hit is not None:
            name, v = hit
            when = _dt.datetime.fromtimestamp(v["revoked_at"], _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            raise SecurityError(f"client {client_id} (site {name!r}) was revoked by the operator at {when}: "
                                "its certificate and identity key are refused")
        return lookup(client_id)

    return wrapped
