"""`fedproxy-secure bench secagg`: masking-mode secure aggregation vs plaintext sum."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fedproxy_secure.cli.app import bench_app

#: fewest clients a secure-aggregation run can have (the threshold t is at least 2)
MIN_CLIENTS = 2


@bench_app.command("secagg")
def bench_secagg(
    clients: int = typer.Option(10, "--clients", min=MIN_CLIENTS,
                                help=f"Number of clients N (at least {MIN_CLIENTS}: secure aggregation needs t >= 2)."),
    params: int = typer.Option(1_000_000, "--params", min=1, help="Vector length P."),
    dropout: float = typer.Option(0.3, "--dropout", min=0.0, max=1.0,
                                  help="Fraction of clients dropping before masked input, in [0, 1)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Runs per setting; timings are medians."),
    neighbours: Optional[int] = typer.Option(None, "--neighbours", help="SecAgg+ degree (default: complete graph up to 64 clients, then k = 2*ceil(log2 n) + 12)."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the results to this JSON file."),
) -> None:
    """Time plaintext vs masked sums (client, server), bytes per stage, error, and with dropouts."""
    from fedproxy_secure.bench import secagg_bench as mod  # an operator's sizing tool: ships in the wheel

    print_secagg_table, run_secagg_bench, write_json = mod.print_secagg_table, mod.run_secagg_bench, mod.write_json

    try:
        result = run_secagg_bench(clients=clients, params=params, dropout=dropout, repeats=repeats,
                                  neighbours=neighbours)
    except ValueError as exc:  # the bench's own check: too few survivors of --dropout for the threshold
        if not str(exc).startswith("--dropout"):
            raise
        raise typer.BadParameter(f"{exc} (with --clients {clients}); lower --dropout or raise --clients",
                                 param_hint="'--dropout'") from None
    print_secagg_table(result)
    if json_file is not None:
        write_json(result, json_file)
        typer.echo(f"wrote {json_file}")
