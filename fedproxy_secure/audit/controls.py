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
    #: SA-H-TIES ``h_norm: reveal`` (each site's scalar h_i in the clear): WARN by default, FAIL when "FAIL"
    h_reveal: Literal["WARN", "FAIL"] = "WARN"


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
    h_norm: Optional[str] = None           # SA-H-TIES: "reveal" | "none"; None = not SA-H-TIES
    verify_aggregate: Optional[bool] = None  # HE: clients recompute the aggregate they decrypt
    transport_note: Optional[str] = None   # how mtls was established (stated in YAML, or read from the server's files)
    # the site's pinned policy (``client.yaml`` ``policy``, as ``ClientPolicy.model_dump()``); None = not given
    client_policy: Optional[dict] = None
    # report contents: the keys the server accepts in a client report, the minimal set, and keys found stored
    report_keys_accepted: Optional[tuple[str, ...]] = None
    report_keys_minimal: Optional[tuple[str, ...]] = None
    report_keys_stored: tuple[str, ...] = ()
    # filled from --server-state / --server-dir
    keys: tuple[KeyValidity, ...] = ()
    audit_log: Optional[dict] = None       # {"path", "ok", "lines", "bad_line", "reason", "keyed"}
    server_state: Optional[str] = None
    # filled from --server-dir only (None = not inspected)
    operator_key: Optional[str] = None     # "encrypted" | "unencrypted" | "missing"
    loose_private_keys: Optional[tuple[str, ...]] = None  # private key files group/other can access
    private_keys_checked: int = 0
    enrol_leftovers: Optional[tuple[str, ...]] = None     # enrol/<site>/<file> still holding a site secret
    revoked_keys: Optional[tuple[str, ...]] = None        # keyset entries marked revoked
    operator_key_revoked: Optional[bool] = None           # keys/operator.pub is a revoked keyset entry
    revoked_sites: Optional[tuple[str, ...]] = None       # enrolments with a status other than active


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
    """FAIL when the enforced t is below the mode's floor of the one threshold rule
    (``wire.threshold``: masking a strict majority and >= 2, HE >= 2, SA-H-TIES >= 3);
    WARN when t < 3 (an aggregate of 2 reveals each update to the other client)."""
    from fedproxy_secure.wire.threshold import MODE_FLOORS, SA_HTIES_MIN

    th = ("T01", "T07", "T19", "T20")
    if d.mode not in ("masking", "he"):
        return Finding("secagg.threshold", "N/A", "no secure aggregation", th)
    n, t = d.n_clients, d.effective_threshold
    if t is None:
        return Finding("secagg.threshold", "FAIL", "no threshold t stated", th)
    floor = MODE_FLOORS[d.mode](n)
    if t < floor:
        return Finding("secagg.threshold", "FAIL", f"t={t} too low for a cohort of {n} in {d.mode} mode (the "
                       f"threshold rule needs t >= {floor}; fix: secagg.threshold >= {floor})", th)
    if d.aggregator == "sa_hties" and t < SA_HTIES_MIN:
        return Finding("secagg.threshold", "FAIL", f"SA-H-TIES with t={t}: with 2 clients the phase-A sum reveals the "
                       f"other client's normalised update (fix: t >= {SA_HTIES_MIN})", th)
    if t < 3:
        return Finding("secagg.threshold", "WARN", f"t={t}: an aggregate of 2 clients reveals each one's update to "
                       "the other; prefer t >= 3", th)
    note = "" if d.threshold in (None, t) else f" (configured {d.threshold}, raised by the round engine)"
    return Finding("secagg.threshold", "PASS", f"t={t} of n={n}{note}", th)


def secagg_identity(d: Deployment, p: Policy) -> Finding:
    """Masking/HE over the network: PASS only when the site policy (``--client-config``) requires
    enrolled identities in every round config (the server process can omit them: only the client's
    check stops key substitution); FAIL when it does not; WARN when no policy was given or in an
    in-process simulation (honest-but-curious server only)."""
    th = ("T07", "T08")
    if d.mode not in ("masking", "he"):
        return Finding("secagg.identity", "N/A", "no secure aggregation", th)
    if d.kind == "simulate":
        return Finding("secagg.identity", "WARN", "in-process simulation: secure aggregation without identity keys "
                       "is secure against an honest-but-curious server only", th)
    if d.client_policy is None:
        return Finding("secagg.identity", "WARN", "the round engine sends enrolled Ed25519 identities, but a "
                       "compromised server can omit them; whether sites insist is in their client.yaml "
                       "(pass --client-config to check policy.require_identities)", th)
    if not d.client_policy.get("require_identities", False):
        return Finding("secagg.identity", "FAIL", "client policy.require_identities is false: a server that omits "
                       "identities can substitute a site's keys unnoticed (fix: policy.require_identities: true)", th)
    return Finding("secagg.identity", "PASS", "the site refuses a round config without an enrolled identity for "
                   "every cohort member (policy.require_identities)", th)


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
        if d.kind == "network":
            return Finding("transport.mtls", "WARN", "transport not stated and not read from a server (state "
                           "transport.mtls, or pass --server-dir DIR to read the server's certificates)", th)
        return Finding("transport.mtls", "N/A", "in-process simulation: nothing goes over a network", th)
    if not d.mtls:
        why = f": {d.transport_note}" if d.transport_note else ""
        return Finding("transport.mtls", "FAIL", f"mutual TLS is off{why}: any host can talk to the server and "
                       "traffic is exposed (fix: transport.mtls: true / reissue the server's pki with 'server init')", th)
    if d.tls_min_version not in (None, "1.3"):
        return Finding("transport.mtls", "FAIL", f"TLS {d.tls_min_version} allowed; the server speaks TLS 1.3 only "
                       "(fix: transport.tls_min_version: '1.3')", th)
    how = f" ({d.transport_note})" if d.transport_note else ""
    return Finding("transport.mtls", "PASS", f"TLS 1.3 with client certificates (CERT_REQUIRED){how}", th)


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
    """FAIL if the server's audit log is missing or does not verify; WARN if it verifies but is
    unkeyed (no ``keys/audit.secret`` beside it: a rewriter can recompute the hashes)."""
    th = ("T06", "T17")
    if d.audit_log is None:
        return Finding("audit.chain", "N/A", "pass --server-dir DIR (or --audit-log FILE) to verify the audit log", th)
    a = d.audit_log
    if not a["ok"]:
        return Finding("audit.chain", "FAIL", f"{a['path']}: line {a['bad_line']}: {a['reason']}", th)
    if a.get("keyed") is False:
        return Finding("audit.chain", "WARN", f"{a['path']}: {a['lines']} entries, hash chain verifies but no MAC "
                       "key beside it (keys/audit.secret): a rewritten log would verify too; export signed heads", th)
    return Finding("audit.chain", "PASS", f"{a['path']}: {a['lines']} entries, chain and MACs verify", th)


def he_verify_aggregate(d: Deployment, p: Policy) -> Finding:
    """FAIL for HE with ``verify_aggregate`` false: the key holder then decrypts whatever ciphertext the
    server sends, e.g. one site's update instead of the sum."""
    th = ("T07",)
    if d.mode != "he":
        return Finding("he.verify_aggregate", "N/A", "not HE mode", th)
    if d.verify_aggregate is False:
        return Finding("he.verify_aggregate", "FAIL", "federation.he.verify_aggregate is false: the key holder "
                       "decrypts a ciphertext it has not recomputed from the signed inputs, so a server can have "
                       "one site's update decrypted (fix: remove verify_aggregate or set it true)", th)
    return Finding("he.verify_aggregate", "PASS", "the key holder recomputes the aggregate from the signed inputs "
                   "before decrypting", th)


def sa_hties_h_norm(d: Deployment, p: Policy) -> Finding:
    """SA-H-TIES ``h_norm: reveal`` sends each site's scalar h_i in the clear: WARN, or FAIL when the
    auditor's policy says so (``--h-reveal fail``); ``none`` PASSes."""
    th = ("T20",)
    if d.aggregator != "sa_hties":
        return Finding("sa_hties.h_norm", "N/A", "not the SA-H-TIES aggregator", th)
    if (d.h_norm or "reveal") == "reveal":
        return Finding("sa_hties.h_norm", p.h_reveal, "sa_hties.h_norm is reveal: each site's h_i (a statistic of "
                       "its update) reaches the server in the clear (fix: server init --h-norm none)", th)
    return Finding("sa_hties.h_norm", "PASS", "h_norm none: no per-site statistic leaves a site in the clear", th)


#: the least a site's pinned policy must demand (the ClientPolicy defaults)
_POLICY_FLOOR = {"min_cohort": 3, "min_threshold": 2, "min_threshold_fraction": 0.5}


def client_policy_strength(d: Deployment, p: Policy) -> Finding:
    """FAIL when the site's pinned policy (``client.yaml`` ``policy``) is weaker than the safe defaults:
    plain mode allowed, cohort < 3, t < 2, a masking threshold fraction under 1/2, identities or HE
    ``verify_aggregate`` not required, no ε cap or a cap above the auditor's ``max_epsilon``, DP not
    required or off in the site's own ``dp``, HE allowed without a roster; WARN
    when it accepts SA-H-TIES ``h_norm: reveal`` or the federation's mode is not in it (sites would
    refuse every round). N/A without ``--client-config``."""
    th = ("T07", "T19", "T20")
    cp = d.client_policy
    if cp is None:
        return Finding("client.policy", "N/A", "pass --client-config client.yaml to check a site's pinned policy", th)
    weak = []
    if "plain" in set(cp.get("modes", ())):
        weak.append("modes allows plain (the update leaves the site in the clear)")
    for k, floor in _POLICY_FLOOR.items():
        if cp.get(k, floor) < floor:
            weak.append(f"{k} = {cp.get(k)} below {floor}")
    for k in ("require_identities", "require_verify_aggregate"):
        if not cp.get(k, False):
            weak.append(f"{k} is false")
    cap = cp.get("max_epsilon")
    if cap is None or cap > p.max_epsilon:
        weak.append(f"max_epsilon = {cap} (audit policy max {p.max_epsilon:g})")
    if not cp.get("require_dp", False):
        weak.append("require_dp is false")
    site_dp = cp.get("site_dp") or {}
    if not site_dp.get("enabled", False):
        weak.append("the site's own dp.enabled is false (its updates carry raw gradients)")
    if not cp.get("he_requires_roster", False):
        weak.append("he_requires_roster is false")
    if weak:
        return Finding("client.policy", "FAIL", "the site's policy is weaker than the safe defaults: "
                       + "; ".join(weak) + " (fix: restore them in client.yaml policy)", th)
    mode = "plain" if d.mode == "none" else d.mode
    if mode not in set(cp.get("modes", ())):
        return Finding("client.policy", "WARN", f"the federation runs mode {mode}, which this site's "
                       f"policy.modes {sorted(cp.get('modes', ()))} refuses: it would train in no round", th)
    if cp.get("allow_h_reveal"):
        return Finding("client.policy", "WARN", "policy.allow_h_reveal is true: the site accepts sending its "
                       "SA-H-TIES h_i in the clear", th)
    return Finding("client.policy", "PASS", f"safe policy: modes {sorted(cp.get('modes', ()))}, t >= "
                   f"{cp.get('min_threshold')}, strict majority, identities and verify_aggregate required, "
                   f"ε <= {cap:g}", th)


def report_contents(d: Deployment, p: Policy) -> Finding:
    """FAIL when the server accepts client-report keys beyond the minimal set (ε accounting and status),
    or when stored reports / audit entries hold any other key (a plaintext training statistic)."""
    th = ("T03",)
    if d.report_keys_accepted is None:
        return Finding("report.contents", "N/A", "in-process simulation: no client report crosses a network", th)
    minimal = set(d.report_keys_minimal or ())
    extra = sorted(set(d.report_keys_accepted) - minimal)
    if extra:
        return Finding("report.contents", "FAIL", f"the server accepts client-report keys {extra} beyond the "
                       f"minimal set {sorted(minimal)}", th)
    stored = sorted(set(d.report_keys_stored) - minimal)
    if stored:
        return Finding("report.contents", "FAIL", f"stored client reports or audit entries carry {stored} (a site "
                       "statistic outside ε) in the server state; purge them and upgrade the clients", th)
    where = " and in every stored report" if d.server_state else ""
    return Finding("report.contents", "PASS", f"only {sorted(minimal)} accepted{where}", th)


def keys_operator_at_rest(d: Deployment, p: Policy) -> Finding:
    """FAIL when the operator's round-config signing key is stored unencrypted (a read of the server's
    disk lets anyone sign downgraded round configs); WARN when it is not on the server at all."""
    th = ("T16",)
    if d.operator_key is None:
        return Finding("keys.operator_at_rest", "N/A", "pass --server-dir DIR to inspect the key files", th)
    if d.operator_key == "unencrypted":
        return Finding("keys.operator_at_rest", "FAIL", "keys/operator.key is not encrypted: whoever reads the "
                       "server's disk can sign round configs (fix: set FEDPROXY_OPERATOR_PASSPHRASE and re-run "
                       "server init, or re-encrypt the key)", th)
    if d.operator_key == "missing":
        return Finding("keys.operator_at_rest", "WARN", "no keys/operator.key in the server folder: round configs "
                       "cannot be signed here (a separate signer?)", th)
    return Finding("keys.operator_at_rest", "PASS", "keys/operator.key is passphrase-encrypted (PKCS#8)", th)


def keys_permissions(d: Deployment, p: Policy) -> Finding:
    """FAIL when any private key or secret in the server folder is accessible by group or others."""
    th = ("T16",)
    if d.loose_private_keys is None:
        return Finding("keys.permissions", "N/A", "pass --server-dir DIR to inspect the key files", th)
    if d.loose_private_keys:
        return Finding("keys.permissions", "FAIL", "group/other can access: " + ", ".join(d.loose_private_keys)
                       + " (fix: chmod 600 each)", th)
    return Finding("keys.permissions", "PASS", f"{d.private_keys_checked} private keys/secrets, all 0600 or "
                   "stricter", th)


def enrol_leftovers(d: Deployment, p: Policy) -> Finding:
    """FAIL when ``enrol/<site>/`` still holds a site's private key or enrolment token after handover."""
    th = ("T05",)
    if d.enrol_leftovers is None:
        return Finding("enrol.leftovers", "N/A", "pass --server-dir DIR to inspect enrol/", th)
    if d.enrol_leftovers:
        return Finding("enrol.leftovers", "FAIL", "site secrets left on the server: " + ", ".join(d.enrol_leftovers)
                       + " (fix: hand each folder to its site, then delete it from the server)", th)
    return Finding("enrol.leftovers", "PASS", "no site key or enrolment token left under enrol/", th)


def keys_revocation(d: Deployment, p: Policy) -> Finding:
    """FAIL when the operator key in ``keys/`` is marked revoked in the server's keyset; otherwise PASS,
    listing revoked keyset keys and revoked sites. N/A without ``--server-dir``."""
    th = ("T16",)
    if d.revoked_keys is None and d.revoked_sites is None:
        return Finding("keys.revocation", "N/A", "pass --server-dir DIR to read keyset and enrolment revocations", th)
    if d.operator_key_revoked:
        return Finding("keys.revocation", "FAIL", "keys/operator.pub is revoked in keys/keyset.json: the server "
                       "signs with a revoked key (fix: rotate the operator key)", th)
    rk, rs = d.revoked_keys or (), d.revoked_sites or ()
    ks = "no keyset" if d.revoked_keys is None else f"{len(rk)} revoked keyset key(s)" + (f" ({', '.join(rk)})" if rk else "")
    return Finding("keys.revocation", "PASS", f"{ks}; {len(rs)} revoked site(s)" + (f" ({', '.join(rs)})" if rs else "")
                   + "; the operator key is not revoked", th)


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
    "he.verify_aggregate": he_verify_aggregate,
    "sa_hties.h_norm": sa_hties_h_norm,
    "client.policy": client_policy_strength,
    "report.contents": report_contents,
    "keys.operator_at_rest": keys_operator_at_rest,
    "keys.permissions": keys_permissions,
    "enrol.leftovers": enrol_leftovers,
    "keys.revocation": keys_revocation,
}


def evaluate(d: Deployment, policy: Policy | None = None) -> list[Finding]:
    """Run every control on ``d`` in a fixed order."""
    policy = policy or Policy()
    return [fn(d, policy) for fn in CONTROLS.values()]
