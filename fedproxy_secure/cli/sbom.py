"""``fedproxy-secure sbom --out sbom.json``: a CycloneDX 1.5 SBOM of the installed environment."""

from __future__ import annotations

from pathlib import Path

import typer

from fedproxy_secure.cli.app import app
from fedproxy_secure.cli.common import console


@app.command("sbom")
def sbom_cmd(
    out: Path = typer.Option(..., "--out", help="where to write the SBOM (CycloneDX 1.5 JSON); must not exist"),
    lock: Path = typer.Option(None, "--lock", help="a hash-pinned lock file (e.g. requirements.lock): components "
                                                   "pinned there carry its SHA-256 hashes"),
) -> None:
    """Write a CycloneDX SBOM of every installed distribution (runtime ones scope 'required')."""
    from fedproxy_secure.audit.sbom import write_sbom

    s = write_sbom(out, lock)
    console.print(f"wrote {s['out']}: CycloneDX {s['spec_version']}, {s['components']} components "
                  f"({s['required']} required at run time, {s['with_hashes']} with lock hashes)"
                  + (", schema-valid" if s["validated"] else ", schema not checked (install jsonschema)"),
                  highlight=False)
