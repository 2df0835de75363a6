"""A site kit (``server enroll SITE --out kit.zip``) on the site's side: its file set, the commented
``client.yaml`` it carries, and :func:`unpack_kit`, which turns it into a ready site folder.

A kit holds ``ca.pem`` (the federation CA), ``client.pem``/``client.key`` (the site's TLS client
certificate and key), ``token`` (one-time enrolment token), ``operator.pub`` (verifies every round
config), ``keyset.json`` (the pinned keyset the proxy bundle must verify against), ``server.json``
(URL and site name), ``policy.json`` (what the federation asks of the site) and ``client.yaml``.
The site folder is the unpacked kit plus ``state/`` (the site's own Ed25519 identity key, made at
first join, the privacy budget and the anti-rollback state).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

from fedproxy_secure.errors import ConfigError, SecurityError
# the kit format is shared with the server (re-exported here for the site's code)
from fedproxy_secure.protocol.kit import (DATA_PLACEHOLDER, KIT_FILES, MAX_KIT_FILE, SECRET_FILES,  # noqa: F401
                                          render_client_yaml)


def _read_kit(kit: Path) -> dict[str, bytes]:
    """The kit's files by name; refuses anything but the known flat file set (no paths, no links, capped sizes)."""
    try:
        zf = zipfile.ZipFile(kit)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"--kit {str(kit)!r}: not a site kit zip ({exc}); use the file from 'server enroll --out'") from None
    out: dict[str, bytes] = {}
    with zf:
        for info in zf.infolist():
            if info.filename not in KIT_FILES or info.is_dir():
                raise SecurityError(f"--kit {kit}: unexpected entry {info.filename!r}; refused (a kit holds only "
                                    f"{', '.join(KIT_FILES)})")
            if info.file_size > MAX_KIT_FILE:
                raise SecurityError(f"--kit {kit}: {info.filename} is larger than {MAX_KIT_FILE} bytes; refused")
            with zf.open(info) as fh:
                body = fh.read(MAX_KIT_FILE + 1)
            if len(body) > MAX_KIT_FILE:
                raise SecurityError(f"--kit {kit}: {info.filename} inflates past {MAX_KIT_FILE} bytes; refused")
            out[info.filename] = body
    missing = [f for f in KIT_FILES if f not in out]
    if missing:
        raise ConfigError(f"--kit {kit}: missing {', '.join(missing)}; ask the operator for a new kit")
    return out


def unpack_kit(kit: str | os.PathLike, site_dir: str | os.PathLike, data: str | os.PathLike,
               threads: int | None = None) -> Path:
    """Unpack ``kit`` into ``site_dir`` (0700; key and token 0600) and write its ``client.yaml`` with ``data``.

    Returns the path of ``client.yaml``. Re-running with the same kit keeps the folder (the state of a
    site that already enrolled, so ``client join --kit`` resumes); a different kit in the same folder
    is refused. The DP settings come from the kit's template (the federation's policy) unless the
    site already edited ``client.yaml``; ``data`` is always the one given.
    """
    from fedproxy_secure.config import read_yaml_mapping

    kit, site = Path(kit), Path(site_dir)
    if not kit.is_file():
        raise ConfigError(f"--kit: file {str(kit)!r} does not exist")
    data = Path(data)
    if not data.is_file():
        raise ConfigError(f"--data: file {str(data)!r} does not exist")
    raw = kit.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    files = _read_kit(kit)
    marker = site / "kit.sha256"
    if marker.is_file():
        if marker.read_text().strip() != digest:
            raise ConfigError(f"--dir {site} already holds another site kit; use a new --dir for this kit")
    else:
        if site.exists() and any(site.iterdir()):
            raise ConfigError(f"--dir {site} exists and is not an empty folder; choose a new --dir")
        site.mkdir(parents=True, exist_ok=True)
        os.chmod(site, 0o700)
        for name, body in files.items():
            path = site / name
            if name in SECRET_FILES:
                from fedproxy_secure.transport.pki import write_private

                write_private(path, body)
            else:
                path.write_bytes(body)
        (site / "client.yaml.kit").write_bytes(files["client.yaml"])  # the operator's template, kept for reference
        marker.write_text(digest + "\n")
    cfg = read_yaml_mapping(site / "client.yaml", what="--kit client.yaml")  # size cap, UTF-8, no YAML aliases
    dp = cfg.get("dp") or {}
    text = render_client_yaml(data=str(data.resolve()), dp=dp, threads=threads or int(cfg.get("threads", 1)),
                              seed=int(cfg.get("seed", 0)))
    (site / "client.yaml").write_text(text)
    return site / "client.yaml"
