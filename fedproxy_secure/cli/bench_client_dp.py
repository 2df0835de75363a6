"""``fedproxy-secure bench client-dp``: ε per round and DP-SGD cost on a proxy (3 rounds + a refused 4th)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fedproxy_secure.cli.app import bench_app
from fedproxy_secure.cli.common import RESEARCH_NOTE, RESEARCH_PANEL, load_benchmark


@bench_app.command("client-dp", epilog=RESEARCH_NOTE, rich_help_panel=RESEARCH_PANEL)
def bench_client_dp(
    model: Path = typer.Option(..., "--model", help="local HF folder of the LLM (the proxy keeps every other block)"),
    data: Path = typer.Option(..., "--data", help="folder of BIG-bench task files"),
    task: str = typer.Option("sports_understanding", "--task"),
    n_train: int = typer.Option(64, "--n-train", min=2),
    rounds: int = typer.Option(3, "--rounds", min=1),
    local_steps: int = typer.Option(5, "--local-steps", min=1),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    epsilon: float = typer.Option(8.0, "--epsilon"),
    threads: int = typer.Option(2, "--threads", min=1),
    json_file: Optional[str] = typer.Option(None, "--json", help="write the figures to this JSON file"),
) -> None:
    """Seconds per step with and without DP (same batch size), ε after each round, refusal past the budget."""
    mod = load_benchmark("client_dp")
    import torch

    torch.set_num_threads(threads)
    res = mod.run_client_dp(str(model), str(data), task=task, n_train=n_train, rounds=rounds, local_steps=local_steps,
                            batch_size=batch_size, epsilon=epsilon, json_file=json_file)
    mod.print_table(res)
