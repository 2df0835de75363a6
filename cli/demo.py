"""``demo --preset tiny|smollm --out DIR``: the whole networked federation on loopback."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.app import app
from cli.common import console, fail


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(..., "--out", help="empty output folder"),
    preset: str = typer.Option("tiny", "--preset", help="tiny | smollm"),
    config: Path = typer.Option(None, "--config", help="YAML with 'clients' and 'federation' sections"),
) -> None:
    """Server + client processes over HTTPS/mTLS with masking; writes report.md, results.json, audit.jsonl."""
    from fedproxy_secure.server.demo import load_demo_config, run_demo

    n, settings = load_demo_config(None if config else preset, config)
    res = run_demo(out, n, settings, log=console.print)
    console.print(f"rounds done {res['rounds_done']}/{settings.rounds} in {res['seconds']} s; "
                  f"audit log {'ok' if res['audit_log_ok'] else 'BROKEN'}; report {out / 'report.md'}")
    if res["rounds_done"] < settings.rounds or not res["audit_log_ok"]:
        raise fail("demo did not complete every round")
