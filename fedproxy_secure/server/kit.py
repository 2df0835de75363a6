"""``server enroll SITE --out kit.zip``: the site kit, one file the operator hands to a site.

The kit holds the CA certificate, a one-time token bound to the site name, the operator's public key,
``server.json`` (federation URL, enrolment URL, site name), the pinned keyset, the federation's policy
for the site and a commented ``client.yaml`` (file set: :data:`fedproxy_secure.protocol.kit.KIT_FILES`),
and no private key: at first join the site makes its own TLS key and Ed25519 identity key and enrols with
a CSR (``server/enrol_csr.py``), so the server never holds a site's private key. Only the token's hash is
kept by the server. A site name gets one kit; ``DIR/kits/SITE.json`` records its SHA-256 and the client
certificate lifetime (no secrets).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path

from fedproxy_secure.auditlog import AuditLog
from fedproxy_secure.protocol.kit import DATA_PLACEHOLDER, KIT_FILES, SECRET_FILES, enrol_url_for, render_client_yaml
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.server.setup import check_site_name, deployment, load_settings, server_paths
from fedproxy_secure.server.store import SQLiteStore
from fedproxy_secure.transport.pki import CLIENT_CERT_DAYS


def site_policy(d: str | os.PathLike, name: str) -> dict:
    """What the federation of server folder ``d`` asks of site ``name`` (written to the kit's ``policy.json``)."""
    s = load_settings(d)
    dep = deployment(d)
    tr = dict(s.train or {})
    return {"site": name, "rounds": s.rounds, "min_clients": s.min_clients, "mode": s.mode,
            "aggregator": s.aggregator, "clip_norm": s.clip_norm, "lora_dim": s.dim,
            "dp_required": tr.get("dp") or {"enabled": False},
            "lora": tr.get("lora"), "train": {k: v for k, v in tr.items() if k not in ("dp", "lora")},
            "bundle_id": dep.get("bundle_id"), "bundle_version": dep.get("bundle_version"),
            "leaves_the_site": ["the clipped LoRA update, only inside secure aggregation "
                                f"({s.mode})", "a report per round: round id, epsilon and delta spent, "
                                "the accountant's name and a status"]}


def write_site_kit(d: str | os.PathLike, name: str, out: str | os.PathLike, url: str | None = None,
                   ttl_s: float = 7 * 86400, enrol_url: str | None = None, cert_days: int = CLIENT_CERT_DAYS) -> dict:
    """Issue site ``name`` a one-time CSR token and write its kit zip to ``out``; returns ``{"path", "sha256", "url"}``.

    Guarantees: the zip holds exactly the kit file set and no private key, is written with mode 0600 and
    replaces nothing (``out`` must not exist); the server keeps only the token's hash. ``url`` defaults to
    the one in ``deployment.json`` (``server init --config``), ``enrol_url`` to :func:`enrol_url_for` of it;
    the certificate the server signs at enrolment is valid ``cert_days`` days. Raises ConfigError naming
    the option when the site already has a kit, no URL is known or the CA key is absent (enrolment
    signs with it).
    """
    check_site_name(name)
    p = server_paths(d)
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {str(out)!r} exists; choose a new file for the kit")
    record = p["kits"] / f"{name}.json"
    from fedproxy_secure.server.revocation import load_revoked

    if name in load_revoked(d):
        raise ConfigError(f"site {name!r} was revoked here (see pki/revoked.json); enrol the site under another name")
    if record.exists():
        raise ConfigError(f"site {name!r} already has a kit ({record}); enrol it under another name")
    url = url or deployment(d).get("url")
    if not url:
        raise ConfigError("--url: this server folder has no deployment URL (made without --config); pass --url")
    if not p["keyset"].is_file():
        raise ConfigError(f"{p['keyset']} is missing: the site kit pins the operator's keyset; make the server folder "
                          "with 'server init --bundle B --keyset K --config F'")
    if not p["ca_key"].is_file():
        raise ConfigError(f"{p['ca_key']} is not here: 'server enroll' needs the CA key (it signs the site's CSR at "
                          "first join); bring it back from offline storage")
    if not 1 <= int(cert_days) <= 825:
        raise ConfigError(f"--cert-days {cert_days}: use 1..825 days")
    enrol_url = enrol_url or enrol_url_for(url)
    policy = site_policy(d, name)
    tmp = out.with_name(f".{out.name}.tmp")
    store = SQLiteStore(p["db"])
    try:
        token = store.add_token(name, ttl_s)
    finally:
        store.close()
    try:
        files = {"ca.pem": p["ca"].read_bytes(), "token": token.encode(), "operator.pub": p["op_pub"].read_bytes(),
                 "server.json": json.dumps({"url": url, "enrol_url": enrol_url, "name": name,
                                            "issued_at": int(time.time())}).encode()}
        files["keyset.json"] = p["keyset"].read_bytes()
        files["policy.json"] = json.dumps(policy, indent=2).encode()
        files["client.yaml"] = render_client_yaml(data=DATA_PLACEHOLDER, dp=policy["dp_required"]).encode()
        if set(files) != set(KIT_FILES):
            raise AssertionError(f"kit file set drifted: {sorted(files)} != {sorted(KIT_FILES)}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # left by an interrupted earlier run
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
            for fname in KIT_FILES:
                info = zipfile.ZipInfo(fname, date_time=(2020, 1, 1, 0, 0, 0))
                info.external_attr = (0o600 if fname in SECRET_FILES else 0o644) << 16
                zf.writestr(info, files[fname], zipfile.ZIP_DEFLATED)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    p["kits"].mkdir(exist_ok=True)
    record.write_text(json.dumps({"site": name, "sha256": digest, "url": url, "enrol_url": enrol_url,
                                  "enrol": "csr", "cert_days": int(cert_days), "issued_at": int(time.time())}))
    AuditLog(p["audit"]).append("kit_issue", {"name": name, "kit_sha256": digest, "token_id": token.split(".")[0],
                                              "enrol": "csr", "cert_days": int(cert_days)})
    return {"path": out, "sha256": digest, "url": url, "enrol_url": enrol_url}
