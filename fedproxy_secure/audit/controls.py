"""Security controls evaluated by ``audit check``: pure functions from a deployment view to findings.

A :class:`Deployment` is the security-relevant view of a config, built from either format by
``check.py``: a ``simulate`` run config (``fedproxy_secure.config.RunConfig``) or a networked demo
config (``clients`` + ``federation``, see ``fedproxy_secure/server/demo.py``). Every control returns
one :class:`Finding` with status ``PASS``, ``WARN``, ``FAIL`` or ``N/A`` and names the threat models
(``threat_models/Txx-*.yaml``) it guards against. Controls never read files; ``check.py`` does I/O.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Optional

Status = Literal["PASS", "WARN", "FAIL", "N/A"]


@dataclass(frozen=True)
class Policy:
    """Thresholds an auditor may tighten: ε above ``max_epsilon`` fails, above ``warn_epsilon`` warns."""

    max_epsilon: float = 10.0
    warn_epsilon: float = 8.0
    max_delta: float = 1e-5
    expiry_warn_days: int = 30


@dataclass(frozen=True)
class KeyValidity:
    """One key or certificate found in the server state: what it is and when it stops being valid."""

    name: str
    not_after: _dt.datetime
    status: str = "active"


@dataclass(frozen=True)
class Deployment:
    """Security-relevant fields of a config (``None`` = not stated)."""

    kind: Literal["simulate", "network"]
    source: str
    n_clients: int
    mode: str                              # none | plain | masking | he
    threshold: Optional[int]               # configured t
    effective_threshold: Optional[int]     # t the code enforces for the cohort
    aggregator: str = "fedavg"
    dp_enabled: Optional[bool] = None
    epsilon: Optional[float] = None
    delta: Optional[float] = None
    clip_norm: Optional[float] = None
    he_flood: Optional[bool] = None        # None = code default (flooding on)
    he_key_holders: Optional[int] = None
    mtls: Optional[bool] = None            # None = not applicable (in-process simulation)
    tls_min_version: Optional[str] = None
    identity_keys: Optional[bool] = None   # masking: advertised keys signed by enrolled identities
    keep_ratio: Optional[float] = None
    # filled from --server-state
    keys: tuple[KeyValidity, ...] = ()
    audit_log: Optional[dict] = None       # {"path", "ok", "lines", "bad_line", "reason"}
    server_state: Optional[str] = None


@dataclass(frozen=True)
class Finding:
    """The outcome of one control."""

    control: str
    status: Status
    message: str
    threats: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        """A JSON-able dict."""
        d = asdict(self)
        d["threats"] = list(self.threats)
        return d


def dp_enabled(d: Deployment, p: Policy) -> Finding:
    """FAIL when DP-SGD is off (or not stated): updates and the global model then carry raw gradients."""
    th = ("T01", "T02", "T03")
    if d.dp_enabled:
        return Finding("dp.enabled", "PASS", "client-side DP-SGD is on (example-level, not institution-level)", th)
    why = "not stated" if d.dp_enabled is None else "off"
    return Finding("dp.enabled", "FAIL", f"DP-SGD is {why}: the aggregate and global model expose client examples to "
                   "inversion and membership inference (fix: dp.enabled: true)", th)


def dp_epsilon(d: Deployment, p: Policy) -> Finding:
    """FAIL when ε > ``max_epsilon`` or δ > ``max_delta``; WARN when ε > ``warn_epsilon``."""
    th = ("T02", "T03")
    if not d.dp_enabled:
        return Finding("dp.epsilon", "N/A", "DP is off (see dp.enabled)", th)
    if d.epsilon is None:
        return Finding("dp.epsilon", "FAIL", "DP is on but no epsilon is stated (fix: dp.epsilon)", th)
    if d.delta is not None and d.delta > p.max_delta:
        return Finding("dp.epsilon", "FAIL", f"delta={d.delta:g} above {p.max_delta:g} (fix: lower dp.delta)", th)
    if d.epsilon > p.max_epsilon:
        return Finding("dp.epsilon", "FAIL", f"epsilon={d.epsilon:g} above the policy maximum {p.max_epsilon:g} "
                       "(fix: lower dp.epsilon or raise --max-epsilon with a written justification)", th)
    if d.epsilon > p.warn_epsilon:
        return Finding("dp.epsilon", "WARN", f"epsilon={d.epsilon:g} above {p.warn_epsilon:g}: weak per-example guarantee", th)
    return Finding("dp.epsilon", "PASS", f"epsilon={d.epsilon:g}, delta={d.delta if d.delta is not None else 'default'} "
                   f"(policy max {p.max_epsilon:g})", th)


def secagg_mode(d: Deployment, p: Policy) -> Finding:
    """FAIL when updates are sent in the clear (mode none/plain): the server sees each client's update."""
    th = ("T01", "T03")
    if d.mode in ("none", "plain"):
        return Finding("secagg.mode", "FAIL", f"secure aggregation is off (mode={d.mode}): the server sees every "
                       "individual update (fix: secagg.mode / federation.mode: masking)", th)
    return Finding("secagg.mode", "PASS", f"mode={d.mode}: the server sees only sums of >= t updates", th)


def secagg_threshold(d: Deployment, p: Policy) -> Finding:
    """FAIL when t <= n/2 (malicious-server bound of SecAgg) or t < 2; WARN when t < 3 (sum of 2 reveals the peer)."""
    th = ("T01", "T07", "T19", "T20")
    if d.mode not in ("masking", "he"):
        return Finding("secagg.threshold", "N/A", "no secure aggregation", th)
    n, t = d.n_clients, d.effective_threshold
    if t is None:
        return Finding("secagg.threshold", "FAIL", "no threshold t stated", th)
    if t < 2 or (d.mode == "masking" and 2 * t <= n):
        return Finding("secagg.threshold", "FAIL", f"t={t} too low for a cohort of {n} (need t > n/2 = {n // 2} "
                       f"and t >= 2; fix: secagg.threshold >= {max(2, n // 2 + 1)})", th)
    if d.aggregator == "sa_hties" and t < 3:
        return Finding("secagg.threshold", "FAIL", f"SA-H-TIES with t={t}: with 2 clients the phase-A sum reveals the "
                       "other client's normalised update (fix: t >= 3)", th)
    if t < 3:
        return Finding("secagg.threshold", "WARN", f"t={t}: an aggregate of 2 clients reveals each one's update to "
                       "the other; prefer t >= 3", th)
    note = "" if d.threshold in (None, t) else f" (configured {d.threshold}, raised by the round engine)"
    return Finding("secagg.threshold", "PASS", f"t={t} of n={n}{note}", th)


def secagg_identity(d: Deployment, p: Policy) -> Finding:
    """WARN for masking without enrolled identity keys (a malicious server can substitute advertised keys)."""
    th = ("T07", "T08")
    if d.mode != "masking":
        return Finding("secagg.identity", "N/A", "not masking mode", th)
    if d.identity_keys:
        return Finding("secagg.identity", "PASS", "advertised keys and consistency acks are signed with enrolled "
                       "Ed25519 identities", th)
    return Finding("secagg.identity", "WARN", "in-process simulation: masking without identity keys is secure "
                   "against an honest-but-curious server only", th)


def he_flooding(d: Deployment, p: Policy) -> Finding:
    """FAIL for HE mode with noise flooding off (CKKS IND-CPA-D key recovery, eprint 2020/1533)."""
    th = ("T11",)
    if d.mode != "he":
        return Finding("he.flooding", "N/A", "not HE mode", th)
    if d.he_flood is False:
        return Finding("he.flooding", "FAIL", "HE mode with noise flooding off: decrypted aggregates leak the CKKS "
                       "error and with it the secret key (IND-CPA-D; fix: secagg.he.flood: true)", th)
    return Finding("he.flooding", "PASS", "decrypted aggregates are noise-flooded and rounded before they leave "
                   "the key holder", th)


def he_shared_key(d: Deployment, p: Policy) -> Finding:
    """WARN in HE mode: the server plus any one key holder can decrypt every individual update."""
    th = ("T12",)
    if d.mode != "he":
        return Finding("he.shared_key", "N/A", "not HE mode", th)
    k = d.he_key_holders or 1
    return Finding("he.shared_key", "WARN", f"HE mode: server + any one of {k} key holder(s) reads every update; "
                   "use masking if a single colluding client is in scope", th)


def transport_mtls(d: Deployment, p: Policy) -> Finding:
    """FAIL when mutual TLS is off or TLS older than 1.3 is allowed; N/A for in-process simulation."""
    th = ("T05", "T09", "T10")
    if d.mtls is None:
        return Finding("transport.mtls", "N/A", "in-process simulation: nothing goes over a network", th)
    if not d.mtls:
        return Finding("transport.mtls", "FAIL", "mutual TLS is off: any host can talk to the server and traffic "
                       "is exposed (fix: transport.mtls: true)", th)
    if d.tls_min_version not in (None, "1.3"):
        return Finding("transport.mtls", "FAIL", f"TLS {d.tls_min_version} allowed; the server speaks TLS 1.3 only "
                       "(fix: transport.tls_min_version: '1.3')", th)
    return Finding("transport.mtls", "PASS", "TLS 1.3 with client certificates (CERT_REQUIRED) and signed requests", th)


def update_clip(d: Deployment, p: Policy) -> Finding:
    """FAIL without a finite positive update clip norm; PASS notes that the server cannot verify clipping."""
    th = ("T04",)
    if d.clip_norm is None or not (d.clip_norm > 0) or d.clip_norm == float("inf"):
        return Finding("update.clip", "FAIL", "no finite update clip norm (fix: train.update_clip_norm / "
                       "federation.clip_norm)", th)
    return Finding("update.clip", "PASS", f"updates clipped to L2 <= {d.clip_norm:g} on the client; the server "
                   "checks only the aggregate norm (clipping before masking is not verifiable)", th)


def proxy_exposure(d: Deployment, p: Policy) -> Finding:
    """WARN when the proxy keeps more than half of the LLM's blocks verbatim (more LLM IP shipped to clients)."""
    th = ("T13",)
    if d.keep_ratio is None:
        return Finding("proxy.exposure", "N/A", "no compression settings in this config", th)
    if d.keep_ratio > 0.5:
        return Finding("proxy.exposure", "WARN", f"keep_ratio={d.keep_ratio:g}: clients receive more than half of "
                       "the LLM's blocks verbatim", th)
    return Finding("proxy.exposure", "PASS", f"keep_ratio={d.keep_ratio:g} (SmolLM2-135M at 0.5: 60.5% of the LLM's "
                   "parameters ship verbatim; see SECURITY.md)", th)


def keys_expiry(d: Deployment, p: Policy, now: _dt.datetime | None = None) -> Finding:
    """FAIL if a certificate or active signing key in the server state has expired; WARN if it expires soon."""
    th = ("T09", "T16")
    if d.server_state is None:
        return Finding("keys.expiry", "N/A", "pass --server-state DIR to check certificates and keysets", th)
    if not d.keys:
        return Finding("keys.expiry", "FAIL", f"no certificate or keyset found in {d.server_state}", th)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    expired = [k for k in d.keys if k.status == "active" and k.not_after <= now]
    if expired:
        names = ", ".join(f"{k.name} (expired {k.not_after:%Y-%m-%d})" for k in expired)
        return Finding("keys.expiry", "FAIL", f"expired: {names} (fix: reissue or rotate)", th)
    soon = [k for k in d.keys if k.status == "active" and k.not_after <= now + _dt.timedelta(days=p.expiry_warn_days)]
    if soon:
        return Finding("keys.expiry", "WARN", "expires within "
                       f"{p.expiry_warn_days} days: " + ", ".join(k.name for k in soon), th)
    first = min(d.keys, key=lambda k: k.not_after)
    return Finding("keys.expiry", "PASS", f"{len(d.keys)} keys/certificates valid; first expiry {first.name} "
                   f"{first.not_after:%Y-%m-%d}", th)


def audit_chain(d: Deployment, p: Policy) -> Finding:
    """FAIL if the server's hash-chained audit log is missing or does not verify."""
    th = ("T06", "T17")
    if d.audit_log is None:
        return Finding("audit.chain", "N/A", "pass --server-state DIR (or --audit-log FILE) to verify the audit log", th)
    a = d.audit_log
    if not a["ok"]:
        return Finding("audit.chain", "FAIL", f"{a['path']}: line {a['bad_line']}: {a['reason']}", th)
    return Finding("audit.chain", "PASS", f"{a['path']}: {a['lines']} entries, chain verifies", th)


CONTROLS: dict[str, Callable[[Deployment, Policy], Finding]] = {
    "secagg.mode": secagg_mode,
    "secagg.threshold": secagg_threshold,
    "secagg.identity": secagg_identity,
    "he.flooding": he_flooding,
    "he.shared_key": he_shared_key,
    "dp.enabled": dp_enabled,
    "dp.epsilon": dp_epsilon,
    "update.clip": update_clip,
    "transport.mtls": transport_mtls,
    "proxy.exposure": proxy_exposure,
    "keys.expiry": keys_expiry,
    "audit.chain": audit_chain,
}


def evaluate(d: Deployment, policy: Policy | None = None) -> list[Finding]:
    """Run every control on ``d`` in a fixed order."""
    policy = policy or Policy()
    return [fn(d, policy) for fn in CONTROLS.values()]
