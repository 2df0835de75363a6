"""``server init|enroll|start|status``: the networked federation server (operator side)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from fedproxy_secure.cli.app import server_app
from fedproxy_secure.cli.common import console


@server_app.command("init")
def init_cmd(
    dir: Path = typer.Option(Path("fedserver"), "--dir", help="server folder to create"),
    rounds: int = typer.Option(3, help="rounds to run"),
    min_clients: int = typer.Option(3, help="clients needed to start a round"),
    threshold: int = typer.Option(2, help="minimum survivors (t) of secure aggregation"),
    mode: str = typer.Option("masking", help="masking | he | plain"),
    dim: int = typer.Option(16, help="length of the update vector"),
    clip_norm: float = typer.Option(1.0, help="L2 clip norm of each update"),
    aggregator: str = typer.Option("fedavg", help="fedavg | sa_hties (two secure sums per round, needs >= 3 clients)"),
    h_norm: Optional[str] = typer.Option(None, "--h-norm",
                                         help="sa_hties only: reveal (default; each h_i in the clear) | none"),
    host: list[str] = typer.Option(["127.0.0.1", "localhost"], "--host", help="names in the server certificate"),
) -> None:
    """Create the CA, the server certificate, the operator key, the store and the audit log."""
    from typing import get_args

    from fedproxy_secure.server.rounds import NET_AGGREGATORS, FederationSettings
    from fedproxy_secure.protocol.sa_hties_wire import SAHTiesOptions
    from fedproxy_secure.server.setup import init_server

    if aggregator not in NET_AGGREGATORS:
        raise typer.BadParameter(f"{aggregator!r}: use one of {', '.join(NET_AGGREGATORS)} over the network "
                                 "(ties/hties need every update in the clear)", param_hint="'--aggregator'")
    h_norms = get_args(SAHTiesOptions.model_fields["h_norm"].annotation)
    if h_norm is not None and h_norm not in h_norms:
        raise typer.BadParameter(f"{h_norm!r}: use one of {', '.join(h_norms)}", param_hint="'--h-norm'")
    if h_norm is not None and aggregator != "sa_hties":
        raise typer.BadParameter(f"{h_norm!r} applies only with --aggregator sa_hties (got {aggregator!r})",
                                 param_hint="'--h-norm'")
    s = FederationSettings(rounds=rounds, min_clients=min_clients, threshold=threshold, mode=mode, dim=dim,
                           clip_norm=clip_norm, aggregator=aggregator,
                           sa_hties={"h_norm": h_norm or "reveal"} if aggregator == "sa_hties" else {})
    p = init_server(dir, s, tuple(host))
    console.print(f"[green]initialised[/] {p['dir']}: CA {p['ca']}, server cert {p['cert']}, operator key {p['op_key']}")


@server_app.command("enroll")
def enroll_cmd(
    name: str = typer.Option(..., "--name", help="site name (letters, digits, - _ .)"),
    dir: Path = typer.Option(Path("fedserver"), "--dir"),
    url: str = typer.Option("https://127.0.0.1:8443", "--url", help="server URL the site will use"),
    ttl_hours: float = typer.Option(168.0, help="token validity"),
) -> None:
    """Issue a one-time enrolment token and a client certificate bundle for a site."""
    from fedproxy_secure.server.setup import enroll_site

    out = enroll_site(dir, name, url, ttl_hours * 3600)
    console.print(f"[green]enrolment bundle[/] {out} (hand it to the site over a trusted channel; token is one-time)")


@server_app.command("start")
def start_cmd(
    dir: Path = typer.Option(Path("fedserver"), "--dir"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8443),
    bundle: Path = typer.Option(None, help="signed proxy bundle folder to publish"),
    max_body: int = typer.Option(64 << 20, help="largest request body in bytes"),
    chunk_bytes: int = typer.Option(1 << 20, help="chunk size of resumable uploads of large stage messages"),
    max_upload: int = typer.Option(256 << 20, help="declared bytes one client may hold in open uploads"),
) -> None:
    """Serve the federation over HTTPS (TLS 1.3, client certificates required)."""
    from fedproxy_secure.server.runner import serve
    from fedproxy_secure.server.uploads import UploadLimits

    console.print(f"serving {dir} on https://{host}:{port}")
    serve(dir, host, port, bundle, max_body, uploads=UploadLimits(chunk_bytes=chunk_bytes, max_bytes=max_upload))


@server_app.command("status")
def status_cmd(dir: Path = typer.Option(Path("fedserver"), "--dir"),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Rounds, clients, dropouts and ε reported, as a table."""
    from rich.table import Table

    from fedproxy_secure.server.app import status_summary
    from fedproxy_secure.server.setup import server_paths
    from fedproxy_secure.server.store import SQLiteStore

    st = SQLiteStore(server_paths(dir)["db"])
    s = status_summary(st)
    st.close()
    if as_json:
        console.print_json(json.dumps(s))
        return
    t = Table(title=f"rounds ({dir})")
    names = {x["client_id"]: x["name"] for x in s["clients"]}
    for col in ("round", "status", "stage", "cohort", "survivors", "dropouts", "ε max", "seconds", "reason"):
        t.add_column(col)
    for r in s["rounds"]:
        t.add_row(str(r["round"]), r["status"], r["stage"], str(r["cohort"]), str(r["survivors"]),
                  str(len(r["dropouts"])), "-" if r["epsilon_max"] is None else f"{r['epsilon_max']:.4g}",
                  str(r["seconds"]), r["reason"] or "")
    console.print(t)
    reported = [r for r in s["rounds"] if r.get("epsilon")]
    if reported:
        e = Table(title="ε reported by each client (cumulative, at the δ it states)")
        e.add_column("site")
        for r in reported:
            e.add_column(f"round {r['round']}")
        for x in s["clients"]:
            e.add_row(x["name"], *("-" if r["epsilon"].get(x["client_id"]) is None
                                   else f"{r['epsilon'][x['client_id']]:.4g}" for r in reported))
        console.print(e)
    c = Table(title="clients")
    for col in ("client", "site", "status", "ε latest"):
        c.add_column(col)
    for x in s["clients"]:
        c.add_row(x["client_id"], x["name"], x["status"], "-" if x.get("epsilon") is None else f"{x['epsilon']:.4g}")
    console.print(c)
