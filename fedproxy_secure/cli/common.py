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


def load_benchmark(name: str):
    """Import the benchmark module ``fedproxy_secure.bench.<name>`` (installed with the package)."""
    import importlib

    return importlib.import_module(f"fedproxy_secure.bench.{name}")


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
