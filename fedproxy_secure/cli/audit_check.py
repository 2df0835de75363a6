"""``fedproxy-secure audit check --server-dir DIR | --config run.yaml``: controls against the threat models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fedproxy_secure.cli.app import audit_app
from fedproxy_secure.cli.common import console

if TYPE_CHECKING:
    from fedproxy_secure.audit.controls import Finding

_COLOURS = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red", "N/A": "dim"}


@audit_app.command("check")
def check_cmd(
    config: Path = typer.Option(None, "--config", help="deployment YAML: networked (clients + federation) or "
                                                       "simulate (RunConfig); not needed with --server-dir"),
    server_dir: Path = typer.Option(None, "--server-dir", help="audit the deployment a server folder (server init) "
                                    "runs: federation.json, pki/, key files, enrol/, keyset, state.db, audit.jsonl"),
    client_config: Path = typer.Option(None, "--client-config", help="a site's client.yaml: check its pinned "
                                       "policy (control client.policy; also decides secagg.identity)"),
    server_state: Path = typer.Option(None, "--server-state", help="with --config: a server folder's certificates, "
                                      "keysets and audit.jsonl"),
    audit_log: Path = typer.Option(None, "--audit-log", help="an audit.jsonl to verify (e.g. the demo's copy)"),
    max_epsilon: float = typer.Option(10.0, "--max-epsilon", help="epsilon above this FAILs"),
    warn_epsilon: float = typer.Option(8.0, "--warn-epsilon", help="epsilon above this WARNs"),
    h_reveal: str = typer.Option("warn", "--h-reveal", help="SA-H-TIES h_norm reveal: warn | fail"),
    fmt: str = typer.Option("table", "--format", help="table | json"),
    head: Path = typer.Option(None, "--head", help="signed head from 'audit export-head': the audit log (of "
                                                   "--server-dir/--server-state or --audit-log) must match it "
                                                   "(control audit.head)"),
) -> None:
    """Evaluate a deployment against the threat models: PASS/WARN/FAIL per control, exit 1 on any FAIL.

    With --server-dir DIR the deployment the server runs is audited (nothing is taken from a YAML):
    federation.json, the server's TLS context, key files (keys.operator_at_rest: the operator key
    encrypted; keys.permissions: every private key 0600), enrol.leftovers (a site key or token
    still under enrol/<site>/), keys.revocation, report.contents (stored reports hold only the
    minimal keys), keys.expiry and audit.chain.

    Controls on the settings: secagg.mode, secagg.threshold (the round engine's threshold rule),
    secagg.identity and client.policy (need --client-config), he.flooding, he.verify_aggregate,
    he.shared_key, sa_hties.h_norm (--h-reveal), dp.enabled, dp.epsilon (ε > --max-epsilon or
    δ > 1e-5), update.clip, transport.mtls, proxy.exposure. N/A controls do not apply.

    Networked YAML: `clients`, `federation` (as `demo --config`), optional `dp` (or
    `federation.train.dp`), `transport` (`mtls`, `tls_min_version`), `compress.keep_ratio`.
    Simulate YAML: a RunConfig (model, data, secagg, dp, ...), plus optional `transport` and
    `secagg.he.flood` / `secagg.he.key_holders`.
    """
    from fedproxy_secure.audit.check import report_json, run_check
    from fedproxy_secure.audit.controls import Policy
    from fedproxy_secure.errors import ConfigError

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format {fmt!r}: use table or json")
    if h_reveal not in ("warn", "fail"):
        raise ConfigError(f"--h-reveal {h_reveal!r}: use warn or fail")
    if config is None and server_dir is None:
        raise ConfigError("audit check: pass --server-dir DIR (the deployment the server runs) or --config FILE")
    if config is not None and server_dir is not None:
        raise ConfigError("audit check: pass --server-dir or --config, not both (--server-dir reads federation.json)")
    if server_state is not None and server_dir is not None:
        raise ConfigError("--server-state is for --config; --server-dir already reads the server folder")
    rep = run_check(config, server_state=server_state, audit_log=audit_log, server_dir=server_dir,
                    client_config=client_config,
                    policy=Policy(max_epsilon=max_epsilon, warn_epsilon=warn_epsilon,
                                  h_reveal="FAIL" if h_reveal == "fail" else "WARN"))
    if head is not None:
        from dataclasses import replace

        state = server_dir if server_dir is not None else server_state
        rep = replace(rep, findings=tuple(rep.findings) + (head_finding(head, state, audit_log),))
    if fmt == "json":
        typer.echo(report_json(rep))
    else:
        from rich.table import Table

        table = Table(title=f"audit check {rep.config} ({rep.kind} deployment)")
        for col in ("control", "status", "detail", "threats"):
            table.add_column(col, overflow="fold")
        for f in rep.findings:
            c = _COLOURS[f.status]
            table.add_row(f.control, f"[{c}]{f.status}[/]", f.message, " ".join(f.threats))
        console.print(table)
        if rep.ignored_sections:
            console.print(f"ignored sections (not security-relevant here): {', '.join(rep.ignored_sections)}")
        console.print(f"result: [{_COLOURS[rep.result]}]{rep.result}[/]")
    raise typer.Exit(rep.exit_code)


def head_finding(head: Path, server_state: Path | None, audit_log: Path | None) -> Finding:
    """Control ``audit.head``: PASS iff the head's operator signature verifies and the audit log
    (``audit_log``, else ``server_state/audit.jsonl``) matches it (MACs checked when the secret is
    beside the log); FAIL naming the reason otherwise. ConfigError when there is no log to check."""
    from fedproxy_secure.artifacts.keys import load_public_key
    from fedproxy_secure.audit.controls import Finding
    from fedproxy_secure.auditlog import load_head, verify_log
    from fedproxy_secure.errors import ConfigError, SecurityError

    if audit_log is None and server_state is None:
        raise ConfigError("--head needs the log to check: pass --server-state DIR or --audit-log FILE")
    log = audit_log if audit_log is not None else server_state / "audit.jsonl"
    pub = (server_state if server_state is not None else log.parent) / "keys" / "operator.pub"
    if not pub.is_file():
        raise ConfigError(f"--head: no operator public key at {pub} to check the head's signature; pass "
                          "--server-state DIR (the folder made by 'server init')")
    try:
        h = load_head(head, load_public_key(pub))
    except SecurityError as exc:
        return Finding("audit.head", "FAIL", f"{head}: {exc}", ("T17",))
    res = verify_log(log, head=h)
    if not res.ok:
        return Finding("audit.head", "FAIL", res.message(log), ("T17",))
    return Finding("audit.head", "PASS", f"{log} matches the signed head at entry {h['index']} "
                                         f"({'MACs verified' if res.keyed else 'no MAC key'})", ("T17",))
