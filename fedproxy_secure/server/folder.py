"""A server folder (``server init``) as other code reads it: the layout and read-only readers.

This is the documented interface to a server folder for code outside the server's own write path:
the auditor (``audit check --server-dir``), serving and the CLI read a folder through it and never
open the server's store or parse its files themselves. Layout::

    DIR/pki/{ca.pem,ca.key,server.pem,server.key}     CA, server certificate (revocation: server/revocation.py)
    DIR/keys/{operator.key,operator.pub}               operator signing key (round configs, bundles)
    DIR/keys/{he_statement.key,keyset.json,audit.secret}
    DIR/federation.json                                the operator's settings (protocol.settings)
    DIR/state.db                                       the server's store (server/store.py)
    DIR/audit.jsonl (+ audit.NNNNNN.jsonl segments)    the audit log (fedproxy_secure.auditlog)
    DIR/enrol/<site>/   DIR/kits/   DIR/bundle/   DIR/deployment.json

Guarantees of the readers: they only read (the store is opened ``mode=ro``; nothing is created,
migrated or written back, unlike :func:`fedproxy_secure.server.setup.load_settings`, which fixes a
missing A seed); a file that is not there reads as empty where that is a valid state (a store
without enrolments) and is a ConfigError naming the file where it is not (no ``federation.json``).
This module imports nothing of the server but its own name, so reading a folder pulls in no server
machinery.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from fedproxy_secure.errors import ConfigError

__all__ = ["ENROL_SECRETS", "read_client_reports", "read_enrolments", "read_settings", "server_paths"]

#: files an enrolment folder ``DIR/enrol/<site>/`` must no longer hold once it was handed to the site
ENROL_SECRETS = ("client.key", "identity.key", "token")


def server_paths(d: str | os.PathLike) -> dict[str, Path]:
    """Every path of server folder ``d`` by role (pure: nothing is checked or created)."""
    d = Path(d)
    return {"dir": d, "ca": d / "pki" / "ca.pem", "ca_key": d / "pki" / "ca.key", "cert": d / "pki" / "server.pem",
            "key": d / "pki" / "server.key", "op_key": d / "keys" / "operator.key", "op_pub": d / "keys" / "operator.pub",
            "settings": d / "federation.json", "db": d / "state.db", "audit": d / "audit.jsonl", "enrol": d / "enrol",
            "he_key": d / "keys" / "he_statement.key", "bundle": d / "bundle", "keyset": d / "keys" / "keyset.json",
            "deployment": d / "deployment.json", "kits": d / "kits"}


def read_settings(d: str | os.PathLike):
    """The :class:`~fedproxy_secure.protocol.settings.FederationSettings` of server folder ``d``, as stored.

    ConfigError naming the file when ``federation.json`` is missing, unreadable or refused by the
    settings' validation. Read-only: a missing A seed stays missing (``a_seed`` None).
    """
    from fedproxy_secure.protocol.settings import FederationSettings

    p = server_paths(d)["settings"]
    if not p.is_file():
        raise ConfigError(f"{Path(d)}: no federation.json; give the folder made by 'fedproxy-secure server init'")
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {p}: {exc}; restore it from a backup or run 'fedproxy-secure server init'") from None
    return FederationSettings.from_dict(raw)


def _rows(d: str | os.PathLike, sql: str) -> list[tuple]:
    """Rows of ``sql`` from the folder's store opened read-only; ``[]`` without a store or table."""
    db = server_paths(d)["db"]
    if not db.is_file():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    except sqlite3.OperationalError:  # the table is not there (an older or empty store)
        return []
    finally:
        con.close()


def read_enrolments(d: str | os.PathLike) -> list[tuple[str, str]]:
    """``(site name, status)`` of every enrolment in the folder's store (status ``active`` or ``revoked``)."""
    return [(str(name), str(status)) for name, status in _rows(d, "SELECT name, status FROM enrolments")]


def read_client_reports(d: str | os.PathLike) -> list[dict]:
    """Every stored client report as it was stored, one dict each; a report that is not a JSON object
    reads as ``{"<unparsable report>": None}`` or ``{"<not an object>": None}`` so a checker sees it."""
    out: list[dict] = []
    for (txt,) in _rows(d, "SELECT report FROM client_reports"):
        try:
            obj = json.loads(txt)
        except (TypeError, ValueError):
            obj = {"<unparsable report>": None}
        out.append(obj if isinstance(obj, dict) else {"<not an object>": None})
    return out
