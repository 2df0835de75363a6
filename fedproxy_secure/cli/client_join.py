"""``client join``: enrol on first use, then take part in every round until the federation ends."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fedproxy_secure.cli.app import client_app
from fedproxy_secure.cli.common import console, fail


@client_app.command("join")
def join_cmd(
    config: Optional[Path] = typer.Option(None, "--config", help="client.yaml: enrolment, state_dir, trainer "
                                          "(lora|synthetic), data, keyset (pinned), dp, threads"),
    kit: Optional[Path] = typer.Option(None, "--kit", help="site kit zip from the operator ('server enroll SITE "
                                       "--out kit.zip'); unpacked into --dir on first use"),
    data: Optional[Path] = typer.Option(None, "--data", help="with --kit: your training file (JSONL "
                                        "{prompt, response} lines, or a BIG-bench .json task)"),
    dir: Path = typer.Option(Path("fedproxy-site"), "--dir", help="with --kit: the site folder (kit, client.yaml, "
                                                                  "state); rerun with the same --dir to resume"),
    server: str = typer.Option(None, "--server", help="server URL (default: the enrolment bundle's)"),
    max_wait: float = typer.Option(3600.0, "--max-wait", help="give up after this many seconds"),
) -> None:
    """Join a federation (mTLS + signed requests + secure aggregation); resumes after a crash.

    With trainer lora the proxy bundle is fetched over the API and verified against the pinned
    keyset before anything is loaded; each round trains LoRA on the site's data (DP-SGD when
    dp.enabled); only the clipped, masked update and a minimal report (round, ε, δ, accountant, status)
    leave the site; the full report (loss, norms, timings) stays in state_dir/reports/.
    Exit status: 0 after taking part in at least one round, 1 (with the reason) when it took part in none.
    """
    from fedproxy_secure.client.join_config import load_join_config
    from fedproxy_secure.client.join_main import run_from_config
    from fedproxy_secure.errors import ConfigError

    if (config is None) == (kit is None):
        raise ConfigError("give either --kit kit.zip --data FILE (first join from a site kit) or --config client.yaml")
    if kit is not None:
        from fedproxy_secure.client.kit import unpack_kit

        if data is None:
            raise ConfigError("--kit needs --data: your training file (JSONL lines with prompt and response)")
        config = unpack_kit(kit, dir, data)
        console.print(f"site folder {dir} (from kit {kit.name}); config {config}", highlight=False, soft_wrap=True)
    elif data is not None:
        raise ConfigError("--data goes with --kit; with --config set 'data' in client.yaml")
    cfg = load_join_config(config)
    if cfg.trainer == "lora":
        _library_noise_to(cfg.state_dir / "warnings.log")
    res = _run(run_from_config, cfg, server, max_wait)
    if not res.rounds_done:
        why = (f"dropped from rounds {res.rounds_dropped}" if res.rounds_dropped
               else "no round was open to join before the federation ended or --max-wait passed")
        raise fail(f"client {res.client_id} took part in no round: {why}; see the lines above and 'server status'")
    console.print(f"[green]done[/] client {res.client_id}: rounds {res.rounds_done}"
                  + (f", dropped from {res.rounds_dropped}" if res.rounds_dropped else ""), highlight=False)


def _run(run_from_config, cfg, server, max_wait):
    """``run_from_config`` with connection failures turned into one line and exit 1."""
    import httpx

    def log(msg: str) -> None:
        console.print(msg, highlight=False, soft_wrap=True)

    try:
        return run_from_config(cfg, server, log=log, max_wait_s=max_wait)
    except (httpx.TransportError, ConnectionError) as exc:
        raise fail(f"cannot reach the federation server: {exc}; check the URL in the kit and that the server runs") \
            from None


def _library_noise_to(path: Path) -> None:
    """Send third-party warnings (transformers, opacus, torch) to ``path`` and turn off the HF progress
    bars, so the console shows the client's own lines; warnings raised by fedproxy_secure stay on the console."""
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "fedproxy_secure" in str(filename):
            shown(message, category, filename, lineno, file, line)
            return
        with path.open("a") as fh:
            fh.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    console.print(f"library warnings go to {path}", highlight=False, soft_wrap=True)
