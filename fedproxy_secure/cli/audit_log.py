"""``fedproxy-secure audit verify-log FILE``: check a hash-chained audit log."""

from __future__ import annotations

from pathlib import Path

import typer

from fedproxy_secure.cli.app import audit_app
from fedproxy_secure.cli.common import console, fail


@audit_app.command("verify-log")
def verify_log_cmd(
    file: Path = typer.Argument(..., help="audit.jsonl written by the server"),
    head: str = typer.Option(None, "--head", help="expected chain head hash (detects a truncated tail)"),
) -> None:
    """Verify the hash chain of an audit log; exit 1 naming the first bad line."""
    from fedproxy_secure.audit.log import verify_log

    res = verify_log(file, expected_head=head)
    if not res.ok:
        raise fail(res.message(file))
    console.print(f"[green]ok[/] {res.message(file)}", highlight=False)
