"""``fedproxy-secure bench scale``: secure-aggregation cost curves as the cohort grows."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fedproxy_secure.cli.app import bench_app
from fedproxy_secure.cli.common import load_benchmark


@bench_app.command("scale")
def bench_scale(
    sizes: Optional[List[int]] = typer.Option(None, "--clients", min=2,
                                              help="Cohort size n (repeatable). Default: 10, 100 and 1000."),
    values: int = typer.Option(1000, "--values", min=1, help="Vector length P of the masking curve (small: n = 1000 runs in-process)."),
    target_values: int = typer.Option(1_000_000, "--target-values", min=0,
                                      help="P of the n = 10 row checked against the 1.2x PRG-limit target (0: skip)."),
    he_values: int = typer.Option(100_000, "--he-values", min=1, help="Values per HE encryption."),
    he_threads: Optional[List[int]] = typer.Option(None, "--he-threads", min=1,
                                                   help="TenSEAL n_threads (repeatable). Default: 1 and 2."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Runs per point up to n = 100 (medians); larger n run once."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Folder for one PNG per curve."),
) -> None:
    """Masking client/server time and bytes at each n with the PRG-limit ratio, and HE µs and bytes per value."""
    import torch

    torch.set_num_threads(1)
    mod = load_benchmark("scale")
    result = mod.run_scale_bench(sizes=sizes or (10, 100, 1000), values=values, target_values=target_values,
                                 he_values=he_values, he_threads=he_threads or (1, 2), repeats=repeats)
    mod.print_table(result)
    if json_file is not None:
        mod.write_json(result, json_file)
        typer.echo(f"wrote {json_file}")
    if plots is not None:
        for p in mod.write_plots(result, plots):
            typer.echo(f"wrote {p}")
