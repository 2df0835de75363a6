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
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from fedproxy_secure.audit.controls import Deployment, Finding, KeyValidity, Policy, evaluate
from fedproxy_secure.audit.log import verify_log
from fedproxy_secure.errors import ConfigError


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
    from fedproxy_secure.protocol.threshold import effective_threshold

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
    mtls, tls_min = _transport(data, default_mtls=True)
    mode = "none" if settings.mode == "plain" else settings.mode
    # the same rule the round engine applies (one function, protocol.threshold)
    eff = effective_threshold(settings.mode, n, settings.threshold, settings.aggregator)
    keep = _mapping(data.get("compress"), "compress").get("keep_ratio")
    d = Deployment(kind="network", source=source, n_clients=n, mode=mode, threshold=settings.threshold,
                   effective_threshold=eff, aggregator=settings.aggregator, dp_enabled=enabled, epsilon=eps,
                   delta=delta, clip_norm=float(settings.clip_norm), mtls=mtls, tls_min_version=tls_min,
                   identity_keys=True, keep_ratio=None if keep is None else float(keep),
                   # network HE: flooding is forced on and there is one key holder per round (he_settings)
                   he_flood=True if mode == "he" else None, he_key_holders=1 if mode == "he" else None)
    return d, tuple(sorted(set(data) - _NETWORK_SECTIONS))


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
    """``verify_log`` of ``path`` as a dict for the ``audit.chain`` control."""
    res = verify_log(path)
    return {"path": str(path), "ok": res.ok, "lines": res.lines, "bad_line": res.bad_line, "reason": res.reason}


def run_check(config: str | Path, server_state: str | Path | None = None, audit_log: str | Path | None = None,
              policy: Policy | None = None) -> CheckReport:
    """Evaluate every control for ``config`` (plus server state / audit log when given)."""
    dep, ignored = load_deployment(config)
    if server_state is not None:
        keys, audit = scan_server_state(server_state)
        dep = replace(dep, keys=keys, audit_log=audit, server_state=str(server_state))
    if audit_log is not None:
        dep = replace(dep, audit_log=audit_log_status(audit_log))
    return CheckReport(str(config), dep.kind, tuple(evaluate(dep, policy)), ignored)


def report_json(rep: CheckReport) -> str:
    """The report as indented JSON text."""
    return json.dumps(rep.to_json(), indent=2, default=str)


__all__ = ["CheckReport", "load_deployment", "run_check", "scan_server_state", "report_json"]
