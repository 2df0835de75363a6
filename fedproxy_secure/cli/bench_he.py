"""``fedproxy-secure bench he``: cost and error of the HE (CKKS) secure-aggregation mode."""

from __future__ import annotations

from typing import List, Optional

import typer

from fedproxy_secure.cli.app import bench_app


@bench_app.command("he")
def bench_he(
    values: Optional[List[int]] = typer.Option(None, "--values", help="Vector size (repeatable). Default: 100000 and 1000000."),
    clients: int = typer.Option(10, "--clients", min=2, help="Number of clients in the round."),
    encryption: str = typer.Option("public", "--encryption", help="public (key holder only) or symmetric (all clients hold the key)."),
    json_file: Optional[str] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
) -> None:
    """Bytes per value, encryption/addition/decryption µs per value and max error of HE aggregation."""
    import torch

    from fedproxy_secure.bench import he_bench as mod  # an operator's sizing tool: ships in the wheel

    torch.set_num_threads(1)
    mod.print_table(mod.run_he_bench(values or None, clients, encryption, json_file))

