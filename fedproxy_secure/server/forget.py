"""``server forget-site NAME``: delete what the server stores about one site, keep what integrity needs.

Order, each step safe to repeat: (1) refuse, changing nothing, while the site is in an open round's cohort
(its messages are needed to finish that round); (2) revoke the site if it is not revoked yet
(:func:`~fedproxy_secure.server.revocation.revoke_site`: identity key refused at once, certificate serials
in the CRL), so it cannot come back while its records go; (3) in one store transaction that re-checks (1),
delete its rows (:meth:`~fedproxy_secure.server.store.SQLiteStore.forget_client`); (4) delete its files: the
kit record ``kits/NAME.json``, the issued-certificate record and certificate ``pki/issued/NAME.{json,pem}``,
a legacy handover folder ``enrol/NAME/``; (5) mark the revocation entry forgotten and append
``site_forgotten`` to the audit log with the counts. A second run finds nothing left and changes nothing
(no second audit entry).

Kept, because integrity needs it: the hash-chained audit log (an entry cannot be removed without breaking the
chain; it names the site in its enrolment, kit and revocation entries and uses the client id elsewhere), the
signed round configs and stage transitions (client ids and identity public keys of each cohort; the configs
are signed and every site keeps them as evidence), the global states and optimizer state (aggregates, no
single site's update), and the revocation entry in ``pki/revoked.json`` and the CRL (client id, certificate
serials: so the certificate stays refused until it expires and the name is not issued again).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from fedproxy_secure.auditlog import AuditLog
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.server.revocation import (load_revoked, mark_forgotten, revocation_paths, revoke_site)
from fedproxy_secure.server.setup import check_site_name, server_paths
from fedproxy_secure.server.store import SQLiteStore

#: what forget-site keeps, and why (printed by --dry-run and written to the audit entry)
KEPT = ("audit log (hash chain; names the site in its enrolment/kit/revocation entries, client id elsewhere)",
        "signed round configs and stage transitions (client id and identity public key per cohort)",
        "global states and optimizer state (aggregates only)",
        "revocation entry and CRL (client id, certificate serials: the certificate stays refused)")


def _client_id(d: Path, name: str) -> str | None:
    store = SQLiteStore(server_paths(d)["db"])
    try:
        for c in store.clients():
            if c["name"] == name:
                return str(c["client_id"])
    finally:
        store.close()
    return load_revoked(d).get(name, {}).get("client_id")


def _site_files(d: Path, name: str) -> list[Path]:
    p, rp = server_paths(d), revocation_paths(d)
    files = [p["kits"] / f"{name}.json", rp["issued"] / f"{name}.json", rp["issued"] / f"{name}.pem"]
    return [f for f in files if f.is_file()] + ([p["enrol"] / name] if (p["enrol"] / name).is_dir() else [])


def _count_files(paths: list[Path]) -> int:
    return sum(sum(1 for f in x.rglob("*") if f.is_file()) if x.is_dir() else 1 for x in paths)


def _busy_error(name: str, cid: str, rid: int, stage: str) -> ConfigError:
    return ConfigError(
        f"NAME: site {name!r} (client {cid}) is in the cohort of open round {rid} (stage {stage!r}); its messages "
        f"are needed to finish that round, so nothing was deleted. Revoke it now with 'server revoke-site {name}' "
        f"(the round drops it at the stage deadline), then run 'server forget-site {name}' again once "
        f"'server status' shows round {rid} done or aborted")


def forget_site(d: str | os.PathLike, name: str, dry_run: bool = False, ca_key: str | os.PathLike | None = None,
                reason: str = "forgotten by the operator (server forget-site)") -> dict:
    """Forget site ``name`` of server folder ``d`` (see the module docstring); returns a summary dict:
    ``name``, ``client_id``, ``rows`` (deleted store rows by kind), ``files`` (deleted file paths relative to
    ``d``), ``kept``, ``revoked_now`` (revoked by this call), ``crl`` (CRL path written, or None),
    ``noop`` (nothing was left), ``dry_run``.

    Raises ConfigError naming the fix when the site is in an open round (``blocked_by`` in a dry run), or when
    ``name`` was never known here. With ``dry_run`` nothing changes (no revocation, no deletion, no audit entry).
    """
    check_site_name(name)
    d = Path(d)
    p = server_paths(d)
    if not p["db"].is_file():
        raise ConfigError(f"--dir: no federation in {str(d)!r} (no state.db); point --dir at a server folder")
    cid = _client_id(d, name)
    store = SQLiteStore(p["db"])
    try:
        busy = store.open_rounds_with(cid) if cid else []
        planned = store.forget_client(name, cid, dry_run=True)
    finally:
        store.close()
    files = _site_files(d, name)
    revoked = load_revoked(d)
    known = cid is not None or any(planned.values()) or files or name in revoked
    if not known:
        raise ConfigError(f"NAME: site {name!r} was never enrolled here; see 'server status' for the site names")
    out = {"name": name, "client_id": cid, "kept": list(KEPT), "dry_run": dry_run, "revoked_now": name not in revoked,
           "crl": None, "files": [f.relative_to(d).as_posix() for f in files], "rows": planned,
           "blocked_by": [{"round": r, "stage": s} for r, s in busy]}
    nothing = not any(planned.values()) and not files
    out["noop"] = nothing and name in revoked and "forgotten_at" in revoked[name]
    if dry_run or out["noop"]:
        return out
    if busy:
        raise _busy_error(name, str(cid), *busy[0])
    if name not in revoked:
        out["crl"] = revoke_site(d, name, reason, ca_key)["crl"]
    store = SQLiteStore(p["db"])
    try:
        out["rows"] = store.forget_client(name, cid)
    except LookupError:  # it checked in to a round between the first check and the revocation
        busy = store.open_rounds_with(str(cid)) or [(-1, "?")]
        raise _busy_error(name, str(cid), *busy[0]) from None
    finally:
        store.close()
    files = _site_files(d, name)  # again: revocation may have read them, nothing else writes them now
    out["files"] = [f.relative_to(d).as_posix() for f in files]
    n_files = _count_files(files)
    for f in files:
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    mark_forgotten(d, name, time.time())
    AuditLog(p["audit"]).append("site_forgotten", {"name": name, "client_id": cid, "rows": out["rows"],
                                                   "files": n_files, "revoked_now": out["revoked_now"],
                                                   "kept": ["audit_log", "round_configs", "transitions",
                                                            "global_state", "revocation_entry"]})
    return out
