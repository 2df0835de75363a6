"""Signed proxy bundles: ``server keygen|issue-proxy|rotate-key|revoke-key``, ``client verify|update-keyset``,
``bench bundle-verify``.

Exit status: 0 ok, 1 invalid (SecurityError: the bundle/keyset is refused), 2 usage error
(ConfigError or bad arguments). Passphrases come from FEDPROXY_KEY_PASSPHRASE or --passphrase-file,
never from a command-line literal.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import List, Optional

import typer

from fedproxy_secure.cli.app import bench_app, client_app, server_app
from fedproxy_secure.cli.common import console, fail, exit_codes

_PP_HELP = "file whose first line is the key passphrase (else env FEDPROXY_KEY_PASSPHRASE; else unencrypted)"
DEFAULT_STATE = Path.home() / ".fedproxy-secure" / "state"


def _parse_now(text: Optional[str]) -> Optional[datetime]:
    if text is None:
        return None
    from fedproxy_secure.artifacts.timeutil import parse_time
    from fedproxy_secure.errors import SecurityError

    try:
        return parse_time(text, "--now")
    except SecurityError as exc:
        raise typer.BadParameter(str(exc)) from None


@server_app.command("keygen")
def keygen_cmd(
    out: Path = typer.Option(..., "--out", help="new key folder: server.key (0600), server.pub, keyset.json"),
    name: Optional[str] = typer.Option(None, "--name", help="deployment name recorded in the keyset"),
    valid_days: int = typer.Option(365, "--valid-days", help="key validity in the keyset"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=_PP_HELP),
) -> None:
    """Make an Ed25519 server key and a first keyset (serial 1) holding it."""
    from fedproxy_secure.artifacts import create_keyset, generate_key, key_id, read_passphrase, save_keyset
    from fedproxy_secure.artifacts import save_private_key, save_public_key

    with exit_codes():
        pp = read_passphrase(passphrase_file)
        ks_path = out / "keyset.json"
        if (out / "server.key").exists() or ks_path.exists():
            from fedproxy_secure.errors import ConfigError

            raise ConfigError(f"{out} already holds a key; choose a new --out folder")
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = generate_key()
        ks = create_keyset(key, name=name, valid_days=valid_days)
        save_private_key(key, out / "server.key", pp)
        save_public_key(key.public_key(), out / "server.pub")
        save_keyset(ks, ks_path)
    if not pp:
        console.print("[yellow]warning:[/] server.key is NOT passphrase-encrypted (set FEDPROXY_KEY_PASSPHRASE)")
    console.print(f"key id {key_id(key)}\nkeyset {ks.name!r} serial {ks.serial} -> {ks_path}", highlight=False)


@server_app.command("issue-proxy")
def issue_proxy_cmd(
    proxy: Path = typer.Option(..., "--proxy", help="proxy model folder (safetensors, config, tokenizer, fedproxy.json)"),
    key: Path = typer.Option(..., "--key", help="KEYDIR/server.key"),
    version: int = typer.Option(..., "--version", min=0, help="bundle version (clients refuse lower versions)"),
    valid_days: int = typer.Option(..., "--valid-days", min=1, help="days from not_before to not_after"),
    out: Path = typer.Option(..., "--out", help="new bundle folder"),
    not_before: Optional[str] = typer.Option(None, "--not-before", help="YYYY-MM-DDTHH:MM:SSZ (default now)"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=_PP_HELP),
) -> None:
    """Copy the proxy into BUNDLE and sign it (MANIFEST.json + MANIFEST.sig)."""
    from fedproxy_secure.artifacts import issue_bundle, load_private_key, read_passphrase

    with exit_codes():
        k = load_private_key(key, read_passphrase(passphrase_file))
        m = issue_bundle(proxy, k, version=version, valid_days=valid_days, out_dir=out, not_before=_parse_now(not_before))
    console.print(
        f"bundle {m.bundle_id} version {m.version} ({len(m.files)} files) valid "
        f"{m.not_before:%Y-%m-%dT%H:%M:%SZ}..{m.not_after:%Y-%m-%dT%H:%M:%SZ} -> {out}",
        highlight=False,
    )


@server_app.command("rotate-key")
def rotate_key_cmd(
    key: Path = typer.Option(..., "--key", help="current KEYDIR/server.key (signs the next keyset)"),
    keyset: Path = typer.Option(..., "--keyset", help="current keyset.json"),
    out: Path = typer.Option(..., "--out", help="new key folder: server.key, server.pub, keyset.json (next serial)"),
    valid_days: int = typer.Option(365, "--valid-days", help="validity of the new key"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=_PP_HELP + "; used for both keys"),
) -> None:
    """Generate the next key and a keyset adding it, signed by the current key."""
    from fedproxy_secure.artifacts import generate_key, key_id, load_keyset, load_private_key, read_passphrase
    from fedproxy_secure.artifacts import rotate_keyset, save_keyset, save_private_key, save_public_key

    with exit_codes():
        pp = read_passphrase(passphrase_file)
        cur = load_private_key(key, pp)
        ks = load_keyset(keyset)
        new = generate_key()
        nxt = rotate_keyset(ks, cur, new.public_key(), valid_days=valid_days)
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        save_private_key(new, out / "server.key", pp)
        save_public_key(new.public_key(), out / "server.pub")
        save_keyset(nxt, out / "keyset.json")
    console.print(f"new key id {key_id(new)}; keyset serial {nxt.serial} signed by {key_id(cur)[:16]}... -> {out}", highlight=False)


@server_app.command("revoke-key")
def revoke_key_cmd(
    key: Path = typer.Option(..., "--key", help="an active key (not the revoked one) that signs the new keyset"),
    keyset: Path = typer.Option(..., "--keyset", help="current keyset.json"),
    revoke: str = typer.Option(..., "--revoke", help="key id to revoke"),
    out: Path = typer.Option(..., "--out", help="new keyset file (next serial)"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=_PP_HELP),
) -> None:
    """Write the next keyset with KEY_ID marked revoked."""
    from fedproxy_secure.artifacts import load_keyset, load_private_key, read_passphrase, revoke_key, save_keyset

    with exit_codes():
        signer = load_private_key(key, read_passphrase(passphrase_file))
        nxt = revoke_key(load_keyset(keyset), signer, revoke)
        save_keyset(nxt, out)
    console.print(f"revoked {revoke[:16]}...; keyset serial {nxt.serial} -> {out}", highlight=False)


@client_app.command("verify")
def verify_cmd(
    bundle: Path = typer.Option(..., "--bundle", help="proxy bundle folder"),
    keyset: Path = typer.Option(..., "--keyset", help="your pinned keyset.json"),
    state_dir: Path = typer.Option(DEFAULT_STATE, "--state-dir", help="anti-rollback state folder"),
    now: Optional[str] = typer.Option(None, "--now", hidden=True, help="testing: verify as of this UTC time"),
) -> None:
    """Verify signature, keys, validity, version and every file; exit 1 if invalid, 2 on usage error."""
    from fedproxy_secure.artifacts import load_keyset, verify_bundle

    when = _parse_now(now)
    with exit_codes():
        vb = verify_bundle(bundle, load_keyset(keyset), now=when, state_dir=state_dir)
    console.print(
        f"[green]ok[/] bundle {vb.bundle_id} version {vb.version}, {len(vb.manifest.files)} files, "
        f"signed by {vb.signer.key_id[:16]}... (keyset {vb.keyset_name!r})",
        highlight=False,
    )


@client_app.command("update-keyset")
def update_keyset_cmd(
    pinned: Path = typer.Option(..., "--pinned", help="your pinned keyset.json (replaced atomically on success)"),
    new: List[Path] = typer.Option(..., "--new", help="next keyset(s), oldest first; each signed by a key of the previous"),
    now: Optional[str] = typer.Option(None, "--now", hidden=True),
) -> None:
    """Move the pin forward through a chain of keysets, each signed by a key active in the previous one."""
    from fedproxy_secure.artifacts import load_keyset, save_keyset, update_pin

    when = _parse_now(now)
    with exit_codes():
        res = update_pin(load_keyset(pinned), [load_keyset(p) for p in new], now=when)
        save_keyset(res, pinned)
    console.print(f"[green]ok[/] pinned keyset {res.name!r} now at serial {res.serial}", highlight=False)


@bench_app.command("bundle-verify")
def bench_bundle_verify_cmd(
    size_mb: int = typer.Option(270, "--size-mb", help="weights size of the synthetic bundle"),
    repeats: int = typer.Option(3, "--repeats", min=1),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="where to build the bundle (default: a temp folder)"),
    out: Path = typer.Option(Path("results/bundle_verify.json"), "--out", help="JSON results"),
) -> None:
    """Time read-only vs read+SHA-256 vs full verify_bundle on a synthetic bundle."""
    from fedproxy_secure.bench import bundle_verify_bench as mod  # an operator's sizing tool: ships in the wheel

    res = mod.run_bench(size_mb=size_mb, repeats=repeats, workdir=workdir, out=out)
    mod.print_table(res, console)
    console.print(f"wrote {out}")

