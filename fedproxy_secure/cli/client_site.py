"""``client roster`` (this site's identity fingerprint), ``client evidence export`` and ``audit evidence``.

Sites of a federation compare fingerprints out of band (not through the operator) and list each
other's in ``client.yaml``'s ``policy.roster``; each site keeps the evidence of every signed config
and server message it acted on, and an auditor checks several sites' exports for equivocation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from fedproxy_secure.cli.app import audit_app, client_app
from fedproxy_secure.cli.common import console, exit_codes, fail

evidence_app = typer.Typer(help="The site's evidence of what the server sent it (for an auditor).",
                           no_args_is_help=True)
client_app.add_typer(evidence_app, name="evidence")


def _site_folders(config: Optional[Path], state: Optional[Path], enrolment: Optional[Path]) -> tuple[Path, Path | None]:
    """``(state_dir, enrolment)`` from ``client.yaml`` (only these two keys are read) or the options."""
    from fedproxy_secure.config import read_yaml_mapping
    from fedproxy_secure.errors import ConfigError

    if (config is None) == (state is None):
        raise ConfigError("give --config client.yaml, or --state DIR (the site's state folder)")
    if config is not None:
        data = read_yaml_mapping(config)
        base = config.resolve().parent
        st = data.get("state_dir", "client-state")
        en = data.get("enrolment")
        if not isinstance(st, str) or (en is not None and not isinstance(en, str)):
            raise ConfigError(f"{config}: state_dir and enrolment must be paths")
        return base / st, (base / en if en else None)
    return state, enrolment


@client_app.command("roster")
def roster_cmd(
    config: Optional[Path] = typer.Option(None, "--config", help="client.yaml (its state_dir is used)"),
    state: Optional[Path] = typer.Option(None, "--state", help="the site's state folder"),
) -> None:
    """Print this site's identity fingerprint, for the other sites' ``policy.roster``.

    Makes the identity key (0600) if the site has none yet, so fingerprints can be exchanged before
    the first join. Read it to the other sites over a channel the operator does not control, and
    list theirs in ``policy.roster``: a round whose cohort holds a member outside the roster is refused.
    """
    from fedproxy_secure.artifacts.keys import generate_key, load_private_key, save_private_key
    from fedproxy_secure.protocol.roster import format_fingerprint, identity_fingerprint

    with exit_codes():
        st, _ = _site_folders(config, state, None)
        st.mkdir(parents=True, exist_ok=True)
        os.chmod(st, 0o700)
        key_path = st / "identity.key"
        if not key_path.exists():
            save_private_key(generate_key(), key_path)
            console.print(f"made this site's identity key {key_path}", highlight=False)
        fp = identity_fingerprint(load_private_key(key_path).public_key().public_bytes_raw())
    console.print(f"fingerprint: {format_fingerprint(fp)}", highlight=False, soft_wrap=True)
    console.print(f"policy.roster entry: {fp}", highlight=False, soft_wrap=True)


@evidence_app.command("export")
def evidence_export_cmd(
    out: Path = typer.Option(..., "--out", help="where to write the export (JSON)"),
    config: Optional[Path] = typer.Option(None, "--config", help="client.yaml (state_dir and enrolment)"),
    state: Optional[Path] = typer.Option(None, "--state", help="the site's state folder"),
    enrolment: Optional[Path] = typer.Option(None, "--enrolment", help="with --state: the enrolment folder "
                                             "(its operator.pub is the key the configs must verify under)"),
) -> None:
    """Export every signed config and server message this site acted on, signed with its identity key.

    Give the file to the auditor: ``audit evidence`` over several sites' exports names each round
    for which the operator key signed different configs (equivocation), with both signed configs.
    """
    from fedproxy_secure.client.evidence import export_evidence
    from fedproxy_secure.errors import ConfigError

    with exit_codes():
        st, en = _site_folders(config, state, enrolment)
        if en is None:
            raise ConfigError("--enrolment: the site's enrolment folder (with operator.pub) is needed")
        ex = export_evidence(st, en)
        out.write_text(json.dumps(ex, indent=1, sort_keys=True))
    n_cfg = sum(1 for e in ex["entries"] if e["kind"] == "round_config")
    console.print(f"wrote {out}: {len(ex['entries'])} entries ({n_cfg} signed round configs), site "
                  f"{ex['client_id']} fingerprint {ex['fingerprint'][:16]}…", highlight=False, soft_wrap=True)


@audit_app.command("evidence")
def audit_evidence_cmd(
    exports: list[Path] = typer.Argument(..., help="sites' files from 'client evidence export'"),
) -> None:
    """Check sites' evidence exports (signatures, chains) and report operator equivocation.

    Exit 0: no round with two different operator-signed configs; exit 1: equivocation found (each
    round with the sites that got each config), or an export that does not verify.
    """
    from fedproxy_secure.client.evidence import find_equivocation

    with exit_codes():
        docs = [json.loads(p.read_text()) for p in exports]
        found = find_equivocation(docs)
    if not found:
        console.print(f"[green]PASS[/] {len(docs)} exports verified: no round with two operator-signed configs",
                      highlight=False)
        return
    for f in found:
        sites = "; ".join(f"{d[:16]}… to {', '.join(c)}" for d, c in f["digests"].items())
        console.print(f"[red]EQUIVOCATION[/] round {f['round']}: the operator key signed {len(f['digests'])} "
                      f"different configs ({sites})", highlight=False, soft_wrap=True)
    raise fail("the operator key signed different round configs for the same round (proof: the signed configs "
               "in the exports)")
