"""``client renew``: a new client certificate for the same site identity (the privacy budget stays)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fedproxy_secure.cli.app import client_app
from fedproxy_secure.cli.common import console, exit_codes


@client_app.command("renew")
def renew_cmd(
    config: Optional[Path] = typer.Option(None, "--config", help="client.yaml (its state_dir and enrolment are "
                                          "used)"),
    state: Optional[Path] = typer.Option(None, "--state", help="the site's state folder (instead of --config)"),
    enrolment: Optional[Path] = typer.Option(None, "--enrolment", help="with --state: the site's enrolment folder "
                                             "(the unpacked kit with client.pem, client.key, ca.pem, server.json)"),
    rotate_tls_key: bool = typer.Option(False, "--rotate-tls-key", help="make a new TLS key for the new "
                                        "certificate (default: keep the current one)"),
    retry: float = typer.Option(60.0, "--retry", help="seconds to keep retrying an unreachable server"),
) -> None:
    """Renew this site's client certificate; same identity key, client id and site name.

    Run it before the certificate expires (it is valid 30 days by default; up to 7 days after expiry the
    server still renews it). The request is signed by the site's identity key and by its current certificate
    key; it goes to the kit's enrolment URL, which 'server start' serves while some site can renew. Nothing in
    the state folder changes: the privacy budget (budget.json), evidence and round state stay where they are.
    The server needs its CA key online to sign. Stop 'client join' first, or restart it after renewing.
    """
    from fedproxy_secure.artifacts.keys import load_private_key
    from fedproxy_secure.cli.client_site import _site_folders
    from fedproxy_secure.client.renew import renew_certificate
    from fedproxy_secure.errors import ConfigError

    with exit_codes():
        st, en = _site_folders(config, state, enrolment)
        if en is None:
            raise ConfigError("--enrolment: the site's enrolment folder is needed (set 'enrolment' in client.yaml "
                              "or pass --enrolment with --state)")
        if not (st / "identity.key").is_file():
            raise ConfigError(f"{st / 'identity.key'} is missing: the site has not joined yet; run 'client join'")
        r = renew_certificate(en, st, load_private_key(st / "identity.key"), rotate_tls_key=rotate_tls_key,
                              retry_s=retry, log=lambda m: console.print(m, highlight=False, soft_wrap=True))
        console.print(f"[green]renewed[/] client {r['client_id']} ({r['name']}); identity and privacy budget "
                      f"unchanged", highlight=False)
