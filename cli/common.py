"""Helpers shared by command modules: consoles and error exits."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print ``message`` as one red line on stderr and return an Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` of this repository by path.

    opacus installs a top-level ``benchmarks`` package that can shadow ours, so the installed
    ``fedproxy-secure`` script loads benchmark files by path from any working directory.
    """
    import importlib.util
    import sys
    from pathlib import Path

    key = f"fedproxy_benchmarks_{name}"
    if key in sys.modules:
        return sys.modules[key]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(key, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod
