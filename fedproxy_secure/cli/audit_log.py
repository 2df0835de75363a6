"""``fedproxy-secure audit verify-log FILE`` and ``audit export-head``: check and anchor an audit log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from fedproxy_secure.cli.app import audit_app
from fedproxy_secure.cli.common import console, fail

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _operator_pub(log: Path, given: Path | None) -> Path:
    pub = given if given is not None else log.parent / "keys" / "operator.pub"
    if not pub.is_file():
        from fedproxy_secure.errors import ConfigError

        raise ConfigError(f"--operator-pub: {pub} does not exist; a signed head is checked against the operator's "
                          "public key (DIR/keys/operator.pub of the server folder)")
    return pub


def _key(log: Path, key_file: Path | None):
    from fedproxy_secure.artifacts.keyfiles import read_secret_file
    from fedproxy_secure.auditlog import AUTO, derive_audit_key

    return AUTO if key_file is None else derive_audit_key(read_secret_file(key_file))


@audit_app.command("verify-log")
def verify_log_cmd(
    file: Path = typer.Argument(..., help="audit.jsonl written by the server"),
    head: str = typer.Option(None, "--head", help="a signed head file from 'audit export-head' (or a bare 64-hex "
                                                  "chain head): refuses rewritten history and a truncated tail"),
    key_file: Path = typer.Option(None, "--key-file", help="the server's audit secret (default: keys/audit.secret "
                                                           "next to the log, when present): check every MAC"),
    operator_pub: Path = typer.Option(None, "--operator-pub", help="operator public key that signed the head "
                                                                   "(default: keys/operator.pub next to the log)"),
) -> None:
    """Verify the hash (and HMAC) chain of an audit log; exit 1 naming the first bad line."""
    from fedproxy_secure.artifacts.keys import load_public_key
    from fedproxy_secure.auditlog import load_head, verify_log

    expected, signed = None, None
    if head is not None:
        if _HEX64.match(head):
            expected = head
        else:
            signed = load_head(head, load_public_key(_operator_pub(file, operator_pub)))
    res = verify_log(file, expected_head=expected, key=_key(file, key_file), head=signed)
    if not res.ok:
        raise fail(res.message(file))
    console.print(f"[green]ok[/] {res.message(file)}", highlight=False)


@audit_app.command("export-head")
def export_head_cmd(
    server_dir: Path = typer.Option(..., "--server-dir", help="server folder (server init): audit.jsonl, "
                                                              "keys/audit.secret, keys/operator.key"),
    out: Path = typer.Option(..., "--out", help="where to write the signed head (JSON); keep it off the server"),
) -> None:
    """Sign the current head of the server's audit log (index, hash, time) with the operator key.

    The operator key is decrypted with FEDPROXY_OPERATOR_PASSPHRASE when it is encrypted. The log
    is verified (MACs included) before anything is signed. Later, ``audit verify-log --head OUT``
    and ``audit check --head OUT`` refuse a log rewritten or truncated before that point.
    """
    from fedproxy_secure.artifacts.keys import load_operator_key
    from fedproxy_secure.auditlog import export_head
    from fedproxy_secure.errors import ConfigError

    log = server_dir / "audit.jsonl"
    if not log.is_file():
        raise ConfigError(f"--server-dir: {log} does not exist; pass the folder made by 'server init'")
    if out.exists():
        raise ConfigError(f"--out: {out} already exists; heads are never overwritten (choose a new name)")
    doc = export_head(log, load_operator_key(server_dir / "keys" / "operator.key"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"[green]signed head[/] entry {doc['index']} hash {doc['hash'][:16]} "
                  f"({'keyed' if doc['keyed'] else 'unkeyed'} log) -> {out}", highlight=False)
