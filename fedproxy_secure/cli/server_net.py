"""``server init|enroll|start|status``: the networked federation server (operator side)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from fedproxy_secure.cli.app import server_app
from fedproxy_secure.cli.common import console


_YAML_FIELDS = {"rounds": "--rounds", "min_clients": "--min-clients", "threshold": "--threshold", "mode": "--mode",
                "dim": "--dim", "clip_norm": "--clip-norm", "aggregator": "--aggregator", "h_norm": "--h-norm",
                "host": "--host"}


@server_app.command("init")
def init_cmd(
    dir: Path = typer.Option(Path("fedserver"), "--dir", help="server folder to create"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="signed proxy bundle ('server issue-proxy'): the "
                                          "LoRA vector size and the FFA A seed are derived from it and fixed"),
    keyset: Optional[Path] = typer.Option(None, "--keyset", help="the keyset the bundle verifies against "
                                          "('server keygen'); every site kit pins it"),
    config: Optional[Path] = typer.Option(None, "--config", help="federation.yaml (url, rounds, min_clients, "
                                          "mode, lora, train, dp, deadlines; see docs/operator-guide.md)"),
    rounds: Optional[int] = typer.Option(None, help="rounds to run [without --bundle; default 3]"),
    min_clients: Optional[int] = typer.Option(None, help="clients needed to start a round [without --bundle; default 3]"),
    threshold: Optional[int] = typer.Option(None, help="minimum survivors (t) [without --bundle; default 2]"),
    mode: Optional[str] = typer.Option(None, help="masking | he | plain [without --bundle; default masking]"),
    dim: Optional[int] = typer.Option(None, help="length of the update vector [only without --bundle, synthetic "
                                      "trainer; default 16]"),
    clip_norm: Optional[float] = typer.Option(None, help="L2 clip norm of each update [without --bundle; default 1.0]"),
    aggregator: Optional[str] = typer.Option(None, help="fedavg | sa_hties [without --bundle; default fedavg]"),
    h_norm: Optional[str] = typer.Option(None, "--h-norm",
                                         help="sa_hties only: reveal (default; each h_i in the clear) | none"),
    host: Optional[list[str]] = typer.Option(None, "--host", help="names in the server certificate [without "
                                             "--bundle; default 127.0.0.1, localhost]"),
) -> None:
    """Create the CA, the server certificate, the operator key, the store and the audit log.

    With --bundle/--keyset/--config (a real federation): the bundle is verified, the proxy's trainable
    LoRA size and a fresh A seed are fixed in federation.json, and the bundle and keyset are copied in.
    """
    from typing import get_args

    from fedproxy_secure.server.rounds import NET_AGGREGATORS, FederationSettings
    from fedproxy_secure.protocol.sa_hties_wire import SAHTiesOptions
    from fedproxy_secure.server.setup import init_server, new_a_seed

    given = {k: v for k, v in dict(rounds=rounds, min_clients=min_clients, threshold=threshold, mode=mode, dim=dim,
                                   clip_norm=clip_norm, aggregator=aggregator, h_norm=h_norm, host=host).items()
             if v is not None}
    if bundle is not None or keyset is not None or config is not None:
        if bundle is None or keyset is None:
            raise typer.BadParameter("a federation from a proxy bundle needs both --bundle and --keyset",
                                     param_hint="'--bundle'")
        if given:
            k = sorted(given)[0]
            why = ("derived from the bundle's proxy and LoRA config" if k == "dim"
                   else "set it in the federation YAML (--config)")
            raise typer.BadParameter(f"not allowed with --bundle: {why}", param_hint=f"'{_YAML_FIELDS[k]}'")
        _init_from_bundle(dir, bundle, keyset, config)
        return
    aggregator = aggregator or "fedavg"
    if aggregator not in NET_AGGREGATORS:
        raise typer.BadParameter(f"{aggregator!r}: use one of {', '.join(NET_AGGREGATORS)} over the network "
                                 "(ties/hties need every update in the clear)", param_hint="'--aggregator'")
    h_norms = get_args(SAHTiesOptions.model_fields["h_norm"].annotation)
    if h_norm is not None and h_norm not in h_norms:
        raise typer.BadParameter(f"{h_norm!r}: use one of {', '.join(h_norms)}", param_hint="'--h-norm'")
    if h_norm is not None and aggregator != "sa_hties":
        raise typer.BadParameter(f"{h_norm!r} applies only with --aggregator sa_hties (got {aggregator!r})",
                                 param_hint="'--h-norm'")
    s = FederationSettings(rounds=3 if rounds is None else rounds, min_clients=3 if min_clients is None else min_clients,
                           threshold=2 if threshold is None else threshold, mode=mode or "masking",
                           dim=16 if dim is None else dim, clip_norm=1.0 if clip_norm is None else clip_norm,
                           aggregator=aggregator, a_seed=new_a_seed(),
                           sa_hties={"h_norm": h_norm or "reveal"} if aggregator == "sa_hties" else {})
    p = init_server(dir, s, tuple(host or ("127.0.0.1", "localhost")))
    console.print(f"[green]initialised[/] {p['dir']}: CA {p['ca']}, server cert {p['cert']}, operator key {p['op_key']}")
    _operator_key_note(p["op_key"])


def _init_from_bundle(dir: Path, bundle: Path, keyset: Path, config: Optional[Path]) -> None:
    from fedproxy_secure.server.fed_config import FederationFile, load_federation_yaml
    from fedproxy_secure.server.setup import init_from_bundle, load_settings

    fed = FederationFile() if config is None else load_federation_yaml(config)
    rec = init_from_bundle(dir, fed, bundle, keyset)
    s = load_settings(dir)
    console.print(f"[green]initialised[/] {dir}: bundle {rec['bundle_id'][:12]} v{rec['bundle_version']} verified "
                  f"(keyset {rec['keyset_name']!r}); LoRA r={fed.lora.r} on {rec['lora_tensors']} tensors -> "
                  f"dim {rec['lora_dim']}, A seed fixed; {s.rounds} rounds, {s.mode}/{s.aggregator}, "
                  f"min {s.min_clients} sites; sites connect to {rec['url']}", highlight=False, soft_wrap=True)
    _operator_key_note(dir / "keys" / "operator.key")


def _operator_key_note(op_key: Path) -> None:
    """Say whether the round-config signing key is encrypted at rest (FEDPROXY_OPERATOR_PASSPHRASE)."""
    from fedproxy_secure.artifacts.keyfiles import OPERATOR_PASSPHRASE_ENV, is_encrypted_pem, read_private_file

    if is_encrypted_pem(read_private_file(op_key)):
        console.print(f"operator key encrypted with the passphrase in {OPERATOR_PASSPHRASE_ENV} ('server start' "
                      "needs the same variable)", highlight=False)
    else:
        console.print(f"[yellow]warning:[/] operator key {op_key} is NOT encrypted at rest; set "
                      f"{OPERATOR_PASSPHRASE_ENV} (>= 12 characters) before 'server init' for a real deployment",
                      highlight=False, soft_wrap=True)


@server_app.command("enroll")
def enroll_cmd(
    site: Optional[str] = typer.Argument(None, help="site name (letters, digits, - _ .)"),
    name: Optional[str] = typer.Option(None, "--name", help="site name (same as the SITE argument)"),
    dir: Path = typer.Option(Path("fedserver"), "--dir"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the site kit zip here (CA cert, one-time token, "
                                       "pinned keyset, URL, policy, client.yaml; no private key: the site makes its "
                                       "own keys at first join and enrols with a CSR)"),
    url: Optional[str] = typer.Option(None, "--url", help="server URL the site will use (default: federation.yaml's "
                                      "url; https://127.0.0.1:8443 for a folder made without --config)"),
    ttl_hours: float = typer.Option(168.0, help="token validity"),
    enrol_url: Optional[str] = typer.Option(None, "--enrol-url", help="[--out] CSR enrolment URL (default: the "
                                            "server URL with port + 1, what 'server start' opens)"),
    cert_days: int = typer.Option(30, "--cert-days", help="[--out] validity of the client certificate signed at "
                                  "enrolment (1..825)"),
) -> None:
    """Enrol a site: a site kit zip (--out; the site enrols with a CSR) or a legacy handover folder."""
    from fedproxy_secure.server.setup import enroll_site

    if (site is None) == (name is None):
        raise typer.BadParameter("give the site name once: as SITE or as --name", param_hint="'SITE'")
    site = site or name
    if out is not None:
        from fedproxy_secure.server.kit import write_site_kit

        k = write_site_kit(dir, site, out, url, ttl_hours * 3600, enrol_url=enrol_url, cert_days=cert_days)
        console.print(f"[green]site kit[/] {k['path']} for {site!r} (sha256 {k['sha256']}, server {k['url']}, "
                      f"enrolment {k['enrol_url']}): hand it to the site over a trusted channel; it holds a one-time "
                      "token and no private key. Keep the CA key until the site has enrolled",
                      highlight=False, soft_wrap=True)
        return
    from fedproxy_secure.server.setup import deployment

    out_dir = enroll_site(dir, site, url or deployment(dir).get("url") or "https://127.0.0.1:8443", ttl_hours * 3600)
    console.print(f"[green]enrolment bundle[/] {out_dir} (hand it to the site over a trusted channel; token is one-time)")


@server_app.command("start")
def start_cmd(
    dir: Path = typer.Option(Path("fedserver"), "--dir"),
    host: str = typer.Option("127.0.0.1"),
    port: Optional[int] = typer.Option(None, help="listen port (default: the port of federation.yaml's url, else 8443)"),
    bundle: Optional[Path] = typer.Option(None, help="signed proxy bundle folder to publish (default: the one "
                                          "'server init --bundle' copied into DIR/bundle; another one is refused)"),
    max_body: int = typer.Option(64 << 20, help="largest request body in bytes"),
    chunk_bytes: int = typer.Option(1 << 20, help="chunk size of resumable uploads of large stage messages"),
    max_upload: int = typer.Option(256 << 20, help="declared bytes one client may hold in open uploads"),
    linger: float = typer.Option(10.0, help="seconds to keep serving after the federation ended (sites read the end)"),
) -> None:
    """Serve the federation over HTTPS (TLS 1.3, client certificates required) until it ends.

    Logs each round's stage transitions and results, one line each. Ends with a stored state:
    finished (exit 0) or failed (exit 1, e.g. more aborted rounds than max_aborts, with the reason).
    """
    from fedproxy_secure.server.lifecycle import run_server
    from fedproxy_secure.server.setup import deployment, server_paths
    from fedproxy_secure.server.uploads import UploadLimits

    dep = deployment(dir)
    stored = server_paths(dir)["bundle"]
    if bundle is None and dep and stored.is_dir():
        bundle = stored
    elif bundle is not None and not dep:
        from fedproxy_secure.errors import ConfigError

        raise ConfigError(f"--bundle: {dir} was made without a bundle, so its vector size (dim) was not derived from "
                          "this proxy; make the federation with 'server init --bundle B --keyset K --config F'")
    elif bundle is not None:
        from fedproxy_secure.artifacts import load_keyset, verify_bundle
        from fedproxy_secure.errors import ConfigError

        vb = verify_bundle(bundle, load_keyset(server_paths(dir)["keyset"]))
        if vb.bundle_id != dep.get("bundle_id"):
            raise ConfigError(f"--bundle {bundle}: bundle {vb.bundle_id[:12]} is not the one this federation was "
                              f"initialised with ({str(dep.get('bundle_id'))[:12]}); its LoRA size and A seed are "
                              "fixed to that bundle. Leave --bundle out, or init a new federation")
    port = port or int(dep.get("port", 8443))

    def log(msg: str) -> None:
        console.print(f"{time.strftime('%H:%M:%S')} {msg}", highlight=False, soft_wrap=True)

    log(f"serving {dir} on https://{host}:{port}" + (f", publishing bundle {bundle}" if bundle else ""))
    from fedproxy_secure.server.enrol_csr import pending_kits

    if pending := pending_kits(dir):
        log(f"CSR enrolment listener on https://{host}:{port + 1} for {len(pending)} unspent kit(s): "
            f"{', '.join(pending)} (signing needs {server_paths(dir)['ca_key']})")
    code = run_server(dir, host, port, bundle, max_body, UploadLimits(chunk_bytes=chunk_bytes, max_bytes=max_upload),
                      linger_s=linger, log=log)
    raise typer.Exit(code)


@server_app.command("revoke-site")
def revoke_site_cmd(
    name: str = typer.Argument(..., help="site name to revoke"),
    dir: Path = typer.Option(Path("fedserver"), "--dir"),
    reason: str = typer.Option("revoked by the operator", "--reason", help="recorded in the audit log"),
    ca_key: Optional[Path] = typer.Option(None, "--ca-key", help="CA key to sign the CRL (default: DIR/pki/ca.key; "
                                          "bring it back if it is kept offline)"),
) -> None:
    """Revoke a site: its identity key is refused at once, its certificate at the handshake (CRL); audited."""
    from fedproxy_secure.server.revocation import revoke_site

    r = revoke_site(dir, name, reason, ca_key)
    console.print(f"[green]revoked[/] site {name!r} (client {r['client_id']}, certificate serials "
                  f"{', '.join(r['serials']) or 'none issued by CSR'}): signed requests by its identity key are "
                  "refused now", highlight=False, soft_wrap=True)
    if r["crl"] is not None:
        console.print(f"CRL {r['crl']} updated: restart 'server start' to refuse the certificate at the handshake",
                      highlight=False, soft_wrap=True)
    else:
        console.print("[yellow]warning:[/] no CA key here, so the CRL was not updated; run again with --ca-key to "
                      "refuse the certificate at the handshake too", highlight=False, soft_wrap=True)


@server_app.command("status")
def status_cmd(dir: Path = typer.Option(Path("fedserver"), "--dir"),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Federation state (running / finished / failed), rounds, clients, dropouts and ε reported.

    Exit status: 0 when the federation is running, not started or finished; 1 when it failed.
    """
    from rich.table import Table

    from fedproxy_secure.server.app import status_summary
    from fedproxy_secure.server.lifecycle import federation_state, stored_state
    from fedproxy_secure.server.setup import load_settings, server_paths
    from fedproxy_secure.server.store import SQLiteStore

    paths = server_paths(dir)
    if not (paths["settings"].is_file() and paths["db"].is_file()):  # never create a store to report on
        from fedproxy_secure.cli.common import fail

        raise fail(f"--dir: no federation in {str(dir)!r} (no federation.json and state.db there); create one with "
                   f"'fedproxy-secure server init --dir {dir}' or point --dir at a server folder", code=2)
    settings = load_settings(dir)
    st = SQLiteStore(paths["db"])
    try:
        s = status_summary(st)
        s["federation"] = federation_state(settings.rounds, settings.max_aborts, st.rounds(), stored_state(st))
    finally:
        st.close()
    code = 1 if s["federation"]["state"] == "failed" else 0
    if as_json:
        console.print_json(json.dumps(s))
        raise typer.Exit(code)
    f = s["federation"]
    colour = {"finished": "green", "failed": "bold red", "running": "yellow"}.get(f["state"], "white")
    console.print(f"federation [{colour}]{f['state']}[/]: {f['rounds_done']}/{f['rounds_total']} rounds done, "
                  f"{f['aborted']} aborted" + (f"; {f['reason']}" if f["reason"] else ""), soft_wrap=True)
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
    raise typer.Exit(code)


@server_app.command("export")
def export_cmd(
    dir: Path = typer.Option(Path("fedserver"), "--dir"),
    round_id: Optional[int] = typer.Option(None, "--round", help="finished round whose global LoRA to export "
                                           "(default: the last finished round)"),
    out: Path = typer.Option(..., "--out", help="new folder: proxy/, adapter/ (PEFT), export.json"),
) -> None:
    """Write the global LoRA of a round as a PEFT adapter, with the verified proxy beside it.

    Load it with peft's AutoPeftModelForCausalLM.from_pretrained(OUT/adapter), or fuse it into the
    LLM with 'server fuse --proxy OUT/proxy --lora OUT/adapter'.
    """
    from fedproxy_secure.server.export import export_round

    rec = export_round(dir, out, round_id)
    console.print(f"[green]exported[/] round {rec['round']} ({rec['lora_dim']} LoRA values, state "
                  f"{rec['state_sha256'][:12]}): adapter {out / 'adapter'}, proxy {out / 'proxy'}",
                  highlight=False, soft_wrap=True)


@server_app.command("forget-site")
def forget_site_cmd(
    name: str = typer.Argument(..., help="site name to forget (see 'server status')"),
    dir: Path = typer.Option(Path("fedserver"), "--dir"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be deleted and kept; change nothing"),
    ca_key: Optional[Path] = typer.Option(None, "--ca-key", help="CA key to sign the CRL when the site is not revoked "
                                          "yet (default: DIR/pki/ca.key)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Delete what the server stores about one site (revoking it first); audited as site_forgotten.

    Deletes the site's enrolment and token rows, its protocol messages and the server's messages to it,
    its uploads, its client reports, its nonces, its kit record, its issued-certificate record and any
    handover folder. Keeps what integrity needs: the audit log, the signed round configs and transitions
    (pseudonymous client ids), the global states (aggregates), the revocation entry and the CRL.
    Refused while the site is in an open round's cohort. Running it again changes nothing.
    """
    from fedproxy_secure.server.forget import forget_site

    r = forget_site(dir, name, dry_run=dry_run, ca_key=ca_key)
    if as_json:
        console.print_json(json.dumps(r))
        return
    rows = ", ".join(f"{k} {v}" for k, v in r["rows"].items() if v) or "no rows"
    files = ", ".join(r["files"]) or "no files"
    if r["noop"]:
        console.print(f"site {name!r} was already forgotten: nothing is left to delete", highlight=False)
        return
    if dry_run:
        console.print(f"[bold]dry run[/]: forget-site {name!r} (client {r['client_id'] or 'never enrolled'}) would "
                      f"{'revoke it, then ' if r['revoked_now'] else ''}delete {rows}; files {files}",
                      highlight=False, soft_wrap=True)
        for b in r["blocked_by"]:
            console.print(f"[yellow]refused now:[/] the site is in the cohort of open round {b['round']} "
                          f"(stage {b['stage']!r}); run it once that round is done or aborted", highlight=False)
    else:
        console.print(f"[green]forgotten[/] site {name!r} (client {r['client_id'] or 'never enrolled'}"
                      f"{', revoked now' if r['revoked_now'] else ''}): deleted {rows}; files {files}; audited "
                      "as site_forgotten", highlight=False, soft_wrap=True)
        if r["revoked_now"] and r["crl"] is None:
            console.print("[yellow]warning:[/] no CA key here, so the CRL was not updated; run 'server revoke-site "
                          f"{name} --ca-key KEY' to refuse its certificate at the handshake too",
                          highlight=False, soft_wrap=True)
    for k in r["kept"]:
        console.print(f"  kept: {k}", highlight=False, soft_wrap=True)
