"""``fedproxy-secure bench aggregate``: how far SA-H-TIES departs from plaintext H-TIES."""

from __future__ import annotations

from typing import Optional

import typer

from fedproxy_secure.cli.common import RESEARCH_NOTE, RESEARCH_PANEL, load_benchmark
from fedproxy_secure.cli.app import bench_app


@bench_app.command("aggregate", epilog=RESEARCH_NOTE, rich_help_panel=RESEARCH_PANEL)
def bench_aggregate(
    clients: int = typer.Option(8, "--clients", min=2, help="Number of clients K."),
    values: int = typer.Option(10000, "--values", min=10, help="Update length P."),
    seeds: int = typer.Option(5, "--seeds", min=1, help="Random seeds per scenario."),
    json_file: Optional[str] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
) -> None:
    """Relative L2 of SA-H-TIES (h revealed / not) vs H-TIES, and of secure sums vs the plain sum."""
    mod = load_benchmark("aggregate_departure")
    import torch

    torch.set_num_threads(1)
    mod.print_table(mod.run_departure_bench(clients, values, seeds, json_path=json_file))

