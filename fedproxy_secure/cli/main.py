"""Entry point: imports every command module of ``cli`` so its commands register, then runs."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import fedproxy_secure.cli as cli
from fedproxy_secure.cli.app import app

_SKIP = {"app", "main", "common"}


def _load_commands() -> None:
    for mod in pkgutil.iter_modules(cli.__path__):
        if mod.name not in _SKIP and not mod.name.startswith("_"):
            importlib.import_module(f"fedproxy_secure.cli.{mod.name}")


def main() -> None:
    """Run the CLI; known SDK errors become a one-line message and a non-zero exit status."""
    from fedproxy_secure.errors import FedProxyError

    _load_commands()
    try:
        app()
    except FedProxyError as exc:  # one line, no traceback, for every error the user can fix
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2 if exc.__class__.__name__ == "ConfigError" else 1)


if __name__ == "__main__":
    main()
