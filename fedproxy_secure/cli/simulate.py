"""``simulate --config F --out DIR``: the whole method in one process (no network)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedproxy_secure.cli.app import app
from fedproxy_secure.cli.common import console


@app.command("simulate")
def simulate_cmd(
    config: Path = typer.Option(..., "--config", help="run config YAML (see examples/tiny.yaml)"),
    out: Path = typer.Option(None, "--out", help="output folder (default: output.dir of the config)"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = torch default)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars and no per-round log lines"),
) -> None:
    """Compress the LLM, train LoRA on the proxy across simulated clients, aggregate, fuse, evaluate.

    Writes OUT/results.json (LLM accuracy before/after, per-round train loss, the config used, per
    client metrics) and prints a table. Invalid configs are refused before any work.
    """
    from fedproxy_secure.config import load_run_config

    cfg = load_run_config(config)  # refused before torch is even imported
    import torch

    from fedproxy_secure.report import print_simulation_table
    from fedproxy_secure.pipelines.simulate import run_simulation

    if threads:
        torch.set_num_threads(threads)
    from fedproxy_secure.progress import capture_library_output, make_console

    out_dir = out or cfg.output.dir
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    capture_library_output(Path(out_dir) / "run.log")  # transformers/opacus warnings, HF bars: not the console
    con = make_console()
    results = run_simulation(cfg, out_dir, log=(lambda m: None) if quiet else (lambda m: con.print(f"[dim]{m}[/]")),
                             quiet=quiet)
    print_simulation_table(results, con)
    console.print(f"results: {Path(out_dir) / 'results.json'}")
