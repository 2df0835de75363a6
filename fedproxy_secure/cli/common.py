"""Helpers shared by command modules: consoles and error exits."""

from __future__ import annotations

import contextlib

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print ``message`` as one red line on stderr and return an Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


#: the research drivers' import name: the top-level ``benchmarks/`` folder of a checkout, outside the wheel
#: (not ``benchmarks``, which opacus installs into site-packages)
BENCHMARKS_PACKAGE = "fedproxy_benchmarks"

#: the ``bench --help`` panel that lists the research commands
RESEARCH_PANEL = "Research commands (from a source checkout: make venv)"

#: the sentence each research command adds to its ``--help``
RESEARCH_NOTE = ("Research command: runs from a source checkout (`make venv` installs its benchmarks/ package); "
                 "not available from the wheel alone.")


def load_benchmark(name: str):
    """Import the research driver ``fedproxy_benchmarks.<name>`` (``benchmarks/<name>.py`` of a checkout).

    The SDK never imports that package (an import-linter contract); the research commands load it here, by
    name. Without it (a wheel installed outside the repository) this raises a one-line usage error, exit 2.
    """
    import importlib

    try:
        importlib.import_module(BENCHMARKS_PACKAGE)
    except ModuleNotFoundError as exc:
        if exc.name != BENCHMARKS_PACKAGE:  # the package is there but something it needs is not: show that
            raise
        raise fail(f"usage: this is a research command and needs the benchmarks/ package ({BENCHMARKS_PACKAGE}), "
                   "which is not installed: run it from a source checkout of fedproxy-secure after `make venv`",
                   code=2) from None
    return importlib.import_module(f"{BENCHMARKS_PACKAGE}.{name}")


@contextlib.contextmanager
def exit_codes():
    """Map SDK errors to one-line messages and exit codes: 2 usage/config, 1 invalid or failed."""
    from fedproxy_secure.errors import ConfigError, FedProxyError, SecurityError

    try:
        yield
    except ConfigError as exc:
        raise fail(f"usage: {exc}", code=2) from None
    except SecurityError as exc:
        raise fail(f"invalid: {exc}", code=1) from None
    except FedProxyError as exc:
        raise fail(str(exc), code=1) from None
