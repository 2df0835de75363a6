"""``audit check``: read a deployment config (and optionally the server state), evaluate the controls.

Two config formats are accepted, told apart by their keys:

* **network** (has ``federation``; the format of ``demo --config``, see ``pipelines/demo.py``):
  ``clients`` (int or ``{count}``), ``federation`` (``FederationSettings``: mode, threshold,
  min_clients, clip_norm, aggregator, train, ...). DP comes from a top-level ``dp`` section or from
  ``federation.train.dp`` (``enabled``, ``epsilon``, ``delta``). Transport from an optional top-level
  ``transport`` section (``mtls``: default true, the server always demands client certificates;
  ``tls_min_version``: default ``"1.3"``). Optional ``compress.keep_ratio``.
* **simulate** (has ``model``/``data``; ``fedproxy_secure.config.RunConfig``): validated with
  ``parse_run_config``. Audit-only extras are read and removed before validation: a top-level
  ``transport`` section and ``secagg.he`` (``flood``, ``key_holders``; the options of
  ``secagg.he.CKKSSummer``).

``--server-state DIR`` adds the certificates (``*.pem``), keysets (``keyset.json``) and the audit
log (``audit.jsonl``) found in DIR.

``--server-dir DIR`` audits the deployment a server folder (``server init``) actually runs instead
of a YAML, read only through the folder's documented interface, :mod:`fedproxy_secure.server.folder`
(layout, settings, enrolments, stored reports; never the server's internals): ``federation.json`` (through ``FederationSettings``), the TLS context the server builds
from ``pki/``, every private key's permissions, the operator key's encryption, site secrets left
under ``enrol/``, keyset and enrolment revocations, stored client reports and the audit log.
``--client-config client.yaml`` adds a site's pinned policy (``client/policy.py``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from fedproxy_secure.audit.controls import Deployment, Finding, KeyValidity, Policy, evaluate
from fedproxy_secure.auditlog import verify_log
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.server.folder import ENROL_SECRETS, read_client_reports, read_enrolments, read_settings, server_paths


@dataclass(frozen=True)
class CheckReport:
    """All findings for one config; ``result`` is FAIL if any control fails, else WARN if any warns."""

    config: str
    kind: str
    findings: tuple[Finding, ...]
    ignored_sections: tuple[str, ...] = ()

    @property
    def result(self) -> str:
        """Overall status: FAIL > WARN > PASS."""
        st = {f.status for f in self.findings}
        return "FAIL" if "FAIL" in st else "WARN" if "WARN" in st else "PASS"

    @property
    def exit_code(self) -> int:
        """1 when any control fails, else 0."""
        return 1 if self.result == "FAIL" else 0

    def to_json(self) -> dict:
        """A JSON-able dict (``--format json``)."""
        return {"config": self.config, "kind": self.kind, "result": self.result,
                "ignored_sections": list(self.ignored_sections),
                "findings": [f.to_json() for f in self.findings]}


_NETWORK_SECTIONS = {"clients", "federation", "network", "dp", "transport", "compress", "name", "description"}


def _mapping(v: Any, where: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: must be a mapping")
    return v


def _transport(data: dict, default_mtls: Optional[bool]) -> tuple[Optional[bool], Optional[str]]:
    tr = _mapping(data.get("transport"), "transport")
    unknown = set(tr) - {"mtls", "tls_min_version"}
    if unknown:
        raise ConfigError(f"transport: unknown keys {sorted(unknown)}; allowed: mtls, tls_min_version")
    mtls = tr.get("mtls", default_mtls)
    if mtls is not None and not isinstance(mtls, bool):
        raise ConfigError(f"transport.mtls = {mtls!r}: use true or false")
    ver = tr.get("tls_min_version")
    return mtls, (None if ver is None else str(ver))


def _dp(section: dict, where: str) -> tuple[Optional[bool], Optional[float], Optional[float]]:
    if not section:
        return None, None, None
    enabled = section.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise ConfigError(f"{where}.enabled = {enabled!r}: use true or false")
    try:
        eps = None if section.get("epsilon") is None else float(section["epsilon"])
        delta = None if section.get("delta") is None else float(section["delta"])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.epsilon / {where}.delta must be numbers") from None
    return enabled, eps, delta


def deployment_from_network(data: dict, source: str) -> tuple[Deployment, tuple[str, ...]]:
    """The deployment view of a networked config (``clients`` + ``federation``)."""
    from fedproxy_secure.protocol.settings import FederationSettings

    fed_raw = dict(_mapping(data.get("federation") or data.get("network"), "federation"))
    settings = FederationSettings.from_dict(fed_raw)  # refuses unknown keys, validates values
    c = data.get("clients", 3)
    n = int(c.get("count", 3)) if isinstance(c, dict) else int(c)
    if n < 1:
        raise ConfigError(f"clients = {n}: need at least one client")
    dp_top = _mapping(data.get("dp"), "dp")
    dp_train = _mapping((settings.train or {}).get("dp"), "federation.train.dp")
    if dp_top and dp_train and dp_top != dp_train:
        raise ConfigError("dp and federation.train.dp disagree; state DP once")
    enabled, eps, delta = _dp(dp_top or dp_train, "dp" if dp_top else "federation.train.dp")
    mtls, tls_min = _transport(data, default_mtls=None)
    keep = _mapping(data.get("compress"), "compress").get("keep_ratio")
    d = replace(_settings_view(settings, n, source), dp_enabled=enabled, epsilon=eps, delta=delta,
                mtls=mtls, tls_min_version=tls_min, keep_ratio=None if keep is None else float(keep),
                transport_note=None if mtls is None else "as stated in the config's transport section")
    return d, tuple(sorted(set(data) - _NETWORK_SECTIONS))


def _settings_view(settings, n: int, source: str) -> Deployment:
    """The deployment fields that follow from validated ``FederationSettings`` for a cohort of ``n``:
    mode, the threshold the round engine enforces (the one rule in ``wire.threshold``), HE
    flooding / ``verify_aggregate`` as ``he_settings`` normalises them, SA-H-TIES ``h_norm``, and the
    client-report keys of the protocol's one schema (``protocol.client_report``), which the server
    accepts and the sites send."""
    from fedproxy_secure.protocol.client_report import CLIENT_REPORT_KEYS
    from fedproxy_secure.wire.threshold import effective_threshold

    mode = "none" if settings.mode == "plain" else settings.mode
    eff = effective_threshold(settings.mode, n, settings.threshold, settings.aggregator)
    he = dict(settings.he or {}) if mode == "he" else {}
    h_norm = None
    if settings.aggregator == "sa_hties":
        h_norm = str((settings.sa_hties or {}).get("h_norm", "reveal"))
    return Deployment(kind="network", source=source, n_clients=n, mode=mode, threshold=settings.threshold,
                      effective_threshold=eff, aggregator=settings.aggregator, clip_norm=float(settings.clip_norm),
                      # he_settings refuses flood != true over the network; read what the settings say
                      he_flood=bool(he.get("flood", True)) if mode == "he" else None,
                      he_key_holders=1 if mode == "he" else None,
                      verify_aggregate=bool(he.get("verify_aggregate", True)) if mode == "he" else None,
                      h_norm=h_norm, report_keys_accepted=tuple(CLIENT_REPORT_KEYS),
                      report_keys_minimal=tuple(CLIENT_REPORT_KEYS))


def deployment_from_run_config(data: dict, source: str, base_dir: Path | None) -> Deployment:
    """The deployment view of a ``simulate`` run config (validated as ``RunConfig``)."""
    from fedproxy_secure.config import SecAggConfig, parse_run_config

    data = copy.deepcopy(data)
    mtls, tls_min = _transport(data, default_mtls=None)
    data.pop("transport", None)
    he: dict = {}
    sec = data.get("secagg")
    if isinstance(sec, dict) and "he" in sec and "he" not in SecAggConfig.model_fields:
        he = _mapping(sec.pop("he"), "secagg.he")
    cfg = parse_run_config(data, base_dir=base_dir)
    if "he" in SecAggConfig.model_fields and getattr(cfg.secagg, "he", None) is not None:
        he_obj = cfg.secagg.he  # pragma: no cover - when the schema grows an HE section
        he = he_obj.model_dump() if hasattr(he_obj, "model_dump") else dict(he_obj)
    flood = he.get("flood")
    if flood is not None and not isinstance(flood, bool):
        raise ConfigError(f"secagg.he.flood = {flood!r}: use true or false")
    n = cfg.clients.count
    t = cfg.secagg.threshold_for(n) if cfg.secagg.mode != "none" else None
    return Deployment(kind="simulate", source=source, n_clients=n, mode=cfg.secagg.mode, threshold=cfg.secagg.threshold,
                      effective_threshold=t, aggregator=cfg.aggregator.name, dp_enabled=cfg.dp.enabled,
                      epsilon=cfg.dp.epsilon, delta=cfg.dp.delta, clip_norm=cfg.train.update_clip_norm,
                      he_flood=flood, he_key_holders=he.get("key_holders"), mtls=mtls, tls_min_version=tls_min,
                      identity_keys=False, keep_ratio=cfg.compress.keep_ratio)


def load_deployment(path: str | Path) -> tuple[Deployment, tuple[str, ...]]:
    """Read a YAML config of either format; ``ConfigError`` names the field for anything invalid."""
    from fedproxy_secure.config import read_yaml_mapping

    path = Path(path)
    data = read_yaml_mapping(path)  # the one config reader: size cap, UTF-8, no YAML aliases
    if "federation" in data or "network" in data:
        return deployment_from_network(data, str(path))
    if "model" in data or "data" in data:
        return deployment_from_run_config(data, str(path), path.parent.resolve()), ()
    raise ConfigError(f"config {path}: cannot tell the format; a networked config has 'clients' and 'federation', "
                      "a simulate config has 'model' and 'data'")


def _pem_validity(p: Path, root: Path) -> list[KeyValidity]:
    from cryptography import x509

    out = []
    data = p.read_bytes()
    if b"BEGIN CERTIFICATE" not in data:
        return out
    for cert in x509.load_pem_x509_certificates(data):
        out.append(KeyValidity(f"certificate {p.relative_to(root).as_posix()}", cert.not_valid_after_utc))
    return out


def scan_server_state(directory: str | Path) -> tuple[tuple[KeyValidity, ...], Optional[dict]]:
    """Certificates, keyset keys and the audit-log verification found under ``directory``."""
    from fedproxy_secure.artifacts.keyset import load_keyset

    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"--server-state: {root} is not a folder; give the folder of 'server init'")
    keys: list[KeyValidity] = []
    for p in sorted(root.rglob("*.pem")):
        if p.is_file() and not p.is_symlink():
            try:
                keys.extend(_pem_validity(p, root))
            except ValueError as exc:
                raise ConfigError(f"{p}: unreadable certificate: {exc}") from None
    for p in sorted(root.rglob("keyset*.json")):
        ks = load_keyset(p)
        for k in ks.keys:
            keys.append(KeyValidity(f"signing key {k.key_id[:16]} in {p.relative_to(root).as_posix()}",
                                    k.valid_to, k.status))
    log = root / "audit.jsonl"
    audit = audit_log_status(log) if log.exists() else {"path": str(log), "ok": False, "lines": 0,
                                                         "bad_line": 0, "reason": "no audit log in the server state"}
    return tuple(keys), audit


def audit_log_status(path: str | Path) -> dict:
    """``verify_log`` of ``path`` as a dict for the ``audit.chain`` control (``keyed``: MACs checked)."""
    from fedproxy_secure.errors import SecurityError

    try:
        res = verify_log(path)
    except (SecurityError, ConfigError) as exc:  # e.g. keys/audit.secret readable by others, or altered
        return {"path": str(path), "ok": False, "lines": 0, "bad_line": 0, "reason": f"MAC key unusable: {exc}",
                "keyed": False}
    return {"path": str(path), "ok": res.ok, "lines": res.lines, "bad_line": res.bad_line, "reason": res.reason,
            "keyed": res.keyed}


#: files under a server folder that hold a private key or a secret (checked for 0600)
_SECRET_NAMES = ("*.key", "*.secret", "token")

def _secret_files(root: Path) -> list[Path]:
    out: set[Path] = set()
    for pat in _SECRET_NAMES:
        out.update(p for p in root.rglob(pat) if p.is_file() and not p.is_symlink())
    return sorted(out)


def _logged_report_keys(log: Path) -> set[str]:
    """Keys of every ``client_report`` entry's report in the audit log (what was copied there)."""
    keys: set[str] = set()
    if not log.is_file():
        return keys
    with open(log, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                e = json.loads(line)
            except ValueError:
                continue  # audit.chain reports the broken line
            rep = (e.get("data") or {}).get("report") if isinstance(e, dict) and e.get("event") == "client_report" else None
            if isinstance(rep, dict):
                keys.update(str(k) for k in rep)
    return keys


def _tls_view(root: Path) -> tuple[bool, Optional[str], str]:
    """(mtls, minimum TLS version, how it was established) from the server's own TLS context and files."""
    import ssl

    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    from fedproxy_secure.errors import SecurityError
    from fedproxy_secure.transport.tls import server_ssl_context

    p = server_paths(root)
    ca, cert, key = p["ca"], p["cert"], p["key"]
    missing = [p.relative_to(root).as_posix() for p in (ca, cert, key) if not p.is_file()]
    if missing:
        return False, None, f"missing {', '.join(missing)}"
    try:
        ctx = server_ssl_context(cert, key, ca)  # the context 'server start' serves with
        ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
        x509.load_pem_x509_certificate(cert.read_bytes()).verify_directly_issued_by(ca_cert)
    except InvalidSignature:
        return False, None, "pki/server.pem was not issued by pki/ca.pem: sites would refuse the server"
    except (OSError, ssl.SSLError, ValueError, TypeError, SecurityError, ConfigError) as exc:
        return False, None, f"the server cannot serve mTLS from pki/: {exc}"
    ver = {ssl.TLSVersion.TLSv1_3: "1.3", ssl.TLSVersion.TLSv1_2: "1.2"}.get(ctx.minimum_version, str(ctx.minimum_version))
    if ctx.verify_mode != ssl.CERT_REQUIRED:
        return False, ver, "the server's TLS context does not require client certificates"
    return True, ver, "read from the server's TLS context: pki/server.pem issued by pki/ca.pem, CERT_REQUIRED"


def _revocations(root: Path) -> tuple[Optional[tuple[str, ...]], Optional[bool]]:
    """Revoked keyset key ids (None without keys/keyset.json) and whether keys/operator.pub is one of them."""
    from fedproxy_secure.artifacts.keys import key_id, load_public_key
    from fedproxy_secure.artifacts.keyset import load_keyset

    p = server_paths(root)
    ks_path, pub = p["keyset"], p["op_pub"]
    if not ks_path.is_file():
        return None, None
    ks = load_keyset(ks_path)  # verifies the keyset's own signature (SecurityError otherwise)
    revoked = tuple(k.key_id[:16] for k in ks.keys if k.status == "revoked")
    op_revoked = None
    if pub.is_file():
        entry = ks.get(key_id(load_public_key(pub)))
        op_revoked = entry is not None and entry.status == "revoked"
    return revoked, op_revoked


def deployment_from_server_dir(directory: str | Path) -> Deployment:
    """The deployment a server folder (``server init``) runs: ``federation.json`` through
    ``FederationSettings``, the TLS context built from ``pki/``, key files (operator key encrypted?
    every private key 0600?), leftover site secrets under ``enrol/``, keyset and enrolment revocations,
    the stored client reports and the audit log. Reads only; ConfigError naming the file if the folder
    is not a server folder."""
    from fedproxy_secure.artifacts.keyfiles import is_encrypted_pem

    root = Path(directory)
    paths = server_paths(root)
    settings = read_settings(root)  # ConfigError naming the folder if it holds no federation.json
    fed = paths["settings"]
    enrolments, reports = read_enrolments(root), read_client_reports(root)
    active = [n for n, st in enrolments if st == "active"]
    n = max(int(settings.min_clients), len(active))
    enabled, eps, delta = _dp(_mapping((settings.train or {}).get("dp"), "federation.train.dp"), "federation.train.dp")
    mtls, tls_min, note = _tls_view(root)
    secrets_ = _secret_files(root)
    loose = tuple(p.relative_to(root).as_posix() for p in secrets_ if p.stat().st_mode & 0o077)
    op = paths["op_key"]
    op_state = ("encrypted" if is_encrypted_pem(op.read_bytes()) else "unencrypted") if op.is_file() else "missing"
    leftovers = tuple(sorted(p.relative_to(root).as_posix() for name in ENROL_SECRETS
                             for p in paths["enrol"].glob(f"*/{name}") if p.exists()))
    revoked, op_revoked = _revocations(root)
    stored = {str(k) for r in reports for k in r} | _logged_report_keys(paths["audit"])
    keys, audit = scan_server_state(root)
    return replace(_settings_view(settings, n, str(fed)), dp_enabled=enabled, epsilon=eps, delta=delta,
                   mtls=mtls, tls_min_version=tls_min, transport_note=note, report_keys_stored=tuple(sorted(stored)),
                   keys=keys, audit_log=audit, server_state=str(root), operator_key=op_state,
                   loose_private_keys=loose, private_keys_checked=len(secrets_), enrol_leftovers=leftovers,
                   revoked_keys=revoked, operator_key_revoked=op_revoked,
                   revoked_sites=tuple(sorted(nm for nm, st in enrolments if st != "active")))


def client_policy_view(path: str | Path) -> dict:
    """The ``policy`` section of a site's ``client.yaml``, validated as ``ClientPolicy`` (defaults filled
    in), plus the site's own ``dp`` switch and ε as ``site_dp``. Only these are read, so the auditor
    needs none of the site's data or keys."""
    from pydantic import ValidationError

    from fedproxy_secure.client.policy import ClientPolicy
    from fedproxy_secure.config import read_yaml_mapping

    data = read_yaml_mapping(Path(path))
    try:
        pol = ClientPolicy.model_validate(_mapping(data.get("policy"), "policy"))
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(x) for x in e["loc"])
        raise ConfigError(f"{path}: policy.{where}: {e['msg']}") from None
    d = pol.model_dump()
    d["modes"] = sorted(d["modes"])
    d["roster"] = sorted(d["roster"])
    dp = _mapping(data.get("dp"), "dp")
    d["site_dp"] = {"enabled": bool(dp.get("enabled", False)), "epsilon": dp.get("epsilon")}
    return d


def run_check(config: str | Path | None = None, server_state: str | Path | None = None,
              audit_log: str | Path | None = None, policy: Policy | None = None, *,
              server_dir: str | Path | None = None, client_config: str | Path | None = None) -> CheckReport:
    """Evaluate every control for a deployment: the one a server folder runs (``server_dir``), else
    the YAML ``config`` (plus ``server_state`` / ``audit_log`` when given); ``client_config`` adds a
    site's pinned policy. ConfigError when neither ``server_dir`` nor ``config`` is given."""
    ignored: tuple[str, ...] = ()
    if server_dir is not None:
        dep = deployment_from_server_dir(server_dir)
        source = str(server_dir)
    elif config is not None:
        dep, ignored = load_deployment(config)
        source = str(config)
        if server_state is not None:
            keys, audit = scan_server_state(server_state)
            dep = replace(dep, keys=keys, audit_log=audit, server_state=str(server_state))
    else:
        raise ConfigError("audit check: pass --server-dir DIR (the deployment the server runs) or --config FILE")
    if audit_log is not None:
        dep = replace(dep, audit_log=audit_log_status(audit_log))
    if client_config is not None:
        dep = replace(dep, client_policy=client_policy_view(client_config))
    return CheckReport(source, dep.kind, tuple(evaluate(dep, policy)), ignored)


def report_json(rep: CheckReport) -> str:
    """The report as indented JSON text."""
    return json.dumps(rep.to_json(), indent=2, default=str)


__all__ = ["CheckReport", "load_deployment", "run_check", "scan_server_state", "report_json",
           "deployment_from_server_dir", "client_policy_view"]
