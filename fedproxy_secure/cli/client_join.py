"""``client join``: enrol on first use, then take part in every round until the federation ends."""

from __future__ import annotations

from pathlib import Path

import typer

from fedproxy_secure.cli.app import client_app
from fedproxy_secure.cli.common import console


@client_app.command("join")
def join_cmd(
    config: Path = typer.Option(..., "--config", help="client.yaml: enrolment, state_dir, trainer (lora|synthetic), "
                                                      "data, keyset (pinned), dp, threads"),
    server: str = typer.Option(None, "--server", help="server URL (default: the enrolment bundle's)"),
) -> None:
    """Join a federation (mTLS + signed requests + secure aggregation); resumes after a crash.

    With trainer lora the proxy bundle is fetched over the API and verified against the pinned
    keyset before anything is loaded; each round trains LoRA on the site's data (DP-SGD when
    dp.enabled); only the clipped, masked update and a scalar report (ε, δ, loss, norms) leave the site.
    """
    from fedproxy_secure.client.join_config import load_join_config
    from fedproxy_secure.client.join_main import run_from_config

    cfg = load_join_config(config)
    res = run_from_config(cfg, server, log=console.print)
    console.print(f"[green]done[/] client {res.client_id}: rounds {res.rounds_done}, dropped from {res.rounds_dropped}")
