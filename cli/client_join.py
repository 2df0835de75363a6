"""``client join``: enrol on first use, then take part in every round until the federation ends."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.app import client_app
from cli.common import console


@client_app.command("join")
def join_cmd(
    config: Path = typer.Option(..., "--config", help="client.yaml: enrolment, state_dir, trainer, seed"),
    server: str = typer.Option(None, "--server", help="server URL (default: the enrolment bundle's)"),
) -> None:
    """Join a federation (mTLS + signed requests + secure aggregation); resumes after a crash."""
    import yaml

    from fedproxy_secure.client.join import join_federation, synthetic_train_fn
    from fedproxy_secure.errors import ConfigError

    cfg = yaml.safe_load(config.read_text()) or {}
    unknown = set(cfg) - {"enrolment", "state_dir", "trainer", "seed"}
    if unknown or "enrolment" not in cfg:
        raise ConfigError(f"{config}: needs 'enrolment' (folder from 'server enroll'); unknown keys {sorted(unknown)}")
    base = config.parent
    trainer = cfg.get("trainer", "synthetic")
    if trainer != "synthetic":
        raise ConfigError(f"{config}: trainer {trainer!r} is not wired to the network client yet; use synthetic")
    res = join_federation(base / cfg["enrolment"], base / cfg.get("state_dir", "client-state"),
                          synthetic_train_fn(int(cfg.get("seed", 0))), server, log=console.print)
    console.print(f"[green]done[/] client {res.client_id}: rounds {res.rounds_done}, dropped from {res.rounds_dropped}")
