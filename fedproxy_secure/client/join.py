"""The client's network loop: enrol once, then take part in every round until the federation ends.

Per round: check in (``join``), fetch and verify the operator-signed round config (our id in
the cohort, the session id fresh), fetch the global state and check its hash, train
(``train_fn``), clip the update to the round's clip norm, run the secure-aggregation stages, and
report ε. State kept in ``state_dir``: the Ed25519 identity key (0600), the enrolment record,
the session ids already used (never reused), the federation-wide fields pinned at the first round
(``federation_pins.json``: ``a_seed``, ``dim``, ``train.lora``) and the evidence log
(``evidence.jsonl``: every signed config and server message acted on, append-only). After a crash
the client re-reads them and joins the next round; the round it crashed in counts it as dropped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fedproxy_secure.artifacts.keys import generate_key, load_private_key, load_public_key, save_private_key
from fedproxy_secure.client.policy import ClientPolicy, PolicyViolation, check_round_policy
from fedproxy_secure.client.report import public_report, save_local_report
from fedproxy_secure.client.stages import make_client_stages
from fedproxy_secure.client.upload import DEFAULT_THRESHOLD, post_stage_message
from fedproxy_secure.errors import ProtocolAbort, SecurityError
from fedproxy_secure.protocol.roundcfg import state_from_bytes, verify_round_config
from fedproxy_secure.transport.http import ServerUnreachable, SignedClient, expect
from fedproxy_secure.transport.signing import b64u

#: train_fn(theta, verified_round_config) -> (update vector, report dict with e.g. epsilon)
TrainFn = Callable[[np.ndarray, dict], tuple[np.ndarray, dict]]


@dataclass
class JoinResult:
    """What one client did: rounds it completed, rounds it was dropped from, reports."""

    client_id: str
    rounds_done: list[int] = field(default_factory=list)
    rounds_dropped: list[int] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)


def clip_update(u: np.ndarray, clip_norm: float) -> np.ndarray:
    """Scale ``u`` down to L2 norm ``clip_norm`` if longer (and each element into the clip range)."""
    u = np.asarray(u, dtype=np.float64)
    n = float(np.linalg.norm(u))
    if n > clip_norm:
        u = u * (clip_norm / n) * (1 - 1e-9)
    return np.clip(u, -clip_norm, clip_norm)


class ClientSession:
    """An enrolled site talking to the federation server."""

    def __init__(self, enrol_dir: str | os.PathLike, state_dir: str | os.PathLike,
                 server_url: str | None = None, retry_s: float = 120.0, log: Callable[[str], None] | None = None,
                 upload_threshold: int = DEFAULT_THRESHOLD, policy: ClientPolicy | None = None) -> None:
        """``upload_threshold``: stage messages larger than this many bytes go as a chunked upload.
        ``policy``: the site's pinned round-config policy (default: :class:`ClientPolicy`, the safe one)."""
        self.upload_threshold = upload_threshold
        self.policy = policy if policy is not None else ClientPolicy()
        self.enrol = Path(enrol_dir)
        self.state = Path(state_dir)
        self.state.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o700)
        info = json.loads((self.enrol / "server.json").read_text())
        self.url = server_url or info["url"]
        self.log = log or (lambda _m: None)
        key_path = self.state / "identity.key"
        if not key_path.exists():
            save_private_key(generate_key(), key_path)
        self.key = load_private_key(key_path)
        self.operator = load_public_key(self.enrol / "operator.pub")
        from fedproxy_secure.client.csr_enrol import csr_enrol, needs_csr_enrolment

        if needs_csr_enrolment(self.enrol):  # a site from a kit: its own TLS key and a CSR, at first join
            csr_enrol(self.enrol, self.state, self.key, retry_s=retry_s, log=self.log)
        rec = self.state / "enrolment.json"
        self.client_id = json.loads(rec.read_text())["client_id"] if rec.exists() else None
        self.http = SignedClient(self.url, self.enrol / "ca.pem", self.enrol / "client.pem", self.enrol / "client.key",
                                 self.key, self.client_id or "enroll", retry_s=retry_s)
        self.used_path = self.state / "used_sessions.json"
        self.used: set[bytes] = {bytes.fromhex(h) for h in json.loads(self.used_path.read_text())} \
            if self.used_path.exists() else set()
        from fedproxy_secure.client.evidence import EvidenceLog

        self.evidence = EvidenceLog(self.state)

    def close(self) -> None:
        """Close connections."""
        self.http.close()

    def _save_used(self) -> None:
        tmp = self.used_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(h.hex() for h in self.used)))
        os.replace(tmp, self.used_path)

    def enroll(self) -> str:
        """Spend the one-time token with a proof of possession of our identity key (first use only)."""
        if self.client_id:
            return self.client_id
        from cryptography.hazmat.primitives import serialization

        pub = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        from fedproxy_secure.artifacts.keyfiles import read_private_file

        token = read_private_file(self.enrol / "token").decode("utf-8").strip()  # refused if group/world-readable
        r = expect(self.http.post_json("/v1/enroll", {"token": token, "pubkey": b64u(pub)}), "enrolment")
        self.client_id = r["client_id"]
        (self.state / "enrolment.json").write_text(json.dumps({"client_id": self.client_id, "name": r["name"]}))
        self.http.client_id = self.client_id
        self.log(f"enrolled as {self.client_id}")
        return self.client_id

    def federation(self) -> dict:
        """Server progress (rounds done/total, current round and stage)."""
        return expect(self.http.get("/v1/federation"), "federation status")

    def _poll(self, rid: int, stage: str, until: float) -> dict | None:
        """Long-poll the server message for ``stage``; None if we are out of this round."""
        while True:
            r = self.http.get(f"/v1/round/{rid}/{stage}", round_id=rid)
            if r.status == 200:
                return r.json()
            if r.status == 410:
                self.log(f"round {rid}: out at stage {stage}: {r.json().get('error')}")
                return None
            if r.status != 202:
                raise SecurityError(f"round {rid} stage {stage}: server answered {r.status}: {r.content[:200]!r}")
            if time.monotonic() > until:
                return None

    def audit_refusal(self, event: str, record: dict) -> None:
        """Append a refusal to the site's local audit log (``state_dir/audit.jsonl``, hash-chained)."""
        from fedproxy_secure.auditlog import AuditLog

        AuditLog(self.state / "audit.jsonl").append(event, record)

    def verified_round_config(self, rid: int, signed: dict) -> dict:
        """The round config of round ``rid``, or a refusal before anything is trained or fetched.

        Checks the operator signature (pinned ``operator.pub``), that the config is for ``rid`` and
        lists us, the site's policy (:func:`check_round_policy`) and the federation pins
        (:func:`fedproxy_secure.client.pins.check_and_pin`). The signed config is kept in the evidence
        log with the outcome. A refusal is written to the local audit log, shown to the site operator
        (``log``) and raised (``SecurityError`` / :class:`PolicyViolation`).
        """
        try:
            return self._verified_round_config(rid, signed)
        except SecurityError as exc:
            self.evidence.round_config(rid, signed, f"refused: {exc}")
            raise

    def _verified_round_config(self, rid: int, signed: dict) -> dict:
        from fedproxy_secure.client.pins import check_and_pin

        try:
            cfg = verify_round_config(self.operator, signed)
            cohort = {c: i for c, i in cfg["cohort"]}
            if cfg["round_id"] != rid or self.client_id not in cohort:
                raise SecurityError(f"round config for round {cfg['round_id']} does not list us in round {rid}")
            from cryptography.hazmat.primitives import serialization

            own = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            check_round_policy(self.policy, cfg, self_identity=(cohort[self.client_id], own))
            check_and_pin(self.state, cfg)
        except PolicyViolation as exc:
            self.audit_refusal("policy_refusal", {**exc.as_record(), "kid": str(signed.get("kid", ""))[:64]})
            self.log(f"REFUSED {exc}")
            raise
        except (SecurityError, KeyError, TypeError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, SecurityError) else f"malformed round config ({exc!r})"
            self.audit_refusal("round_config_refusal", {"round": rid, "reason": reason[:300],
                                                        "kid": str(signed.get("kid", ""))[:64]
                                                        if isinstance(signed, dict) else ""})
            self.log(f"REFUSED round {rid}: {reason}")
            if isinstance(exc, SecurityError):
                raise
            raise SecurityError(f"round {rid}: {reason}") from None
        self.evidence.round_config(rid, signed, "accepted")
        return cfg

    def run_round(self, rid: int, train_fn: TrainFn, die_at: str | None = None) -> dict | None:
        """Take part in round ``rid`` (already at its ``join`` stage); the report, or None if dropped.

        The ``join`` carries a commitment to a fresh nonce (the SecAgg+ graph seed's commit-reveal,
        :mod:`fedproxy_secure.wire.binding`); the nonce is revealed only in the signed
        advertised keys, after the signed round config fixed every commitment.
        """
        from fedproxy_secure.wire.binding import graph_commit, new_graph_nonce

        nonce = new_graph_nonce()
        r = self.http.post_json(f"/v1/round/{rid}/join", {"type": "join", "graph_commit": graph_commit(nonce).hex()},
                                round_id=rid)
        if r.status != 200:
            self.log(f"round {rid}: join refused ({r.status})")
            return None
        signed = self._poll(rid, "config", time.monotonic() + 600)
        if signed is None:
            return None
        cfg = self.verified_round_config(rid, signed)
        cohort = {c: i for c, i in cfg["cohort"]}
        session = bytes.fromhex(cfg["session_id"])
        if session in self.used:
            raise ProtocolAbort(f"round {rid}: session id already used: refusing (replay)")
        st = self.http.get(f"/v1/state/{cfg['state_round']}", round_id=rid)
        if st.status != 200 or hashlib.sha256(st.content).hexdigest() != cfg["state_sha256"]:
            raise SecurityError(f"round {rid}: global state does not match the signed hash")
        theta = state_from_bytes(st.content)["theta"]
        if theta.shape != (int(cfg["dim"]),):
            raise SecurityError(f"round {rid}: global state has {theta.shape[0]} values, the signed config says {cfg['dim']}")
        update, report = train_fn(theta, cfg)
        update = clip_update(update, float(cfg["clip_norm"]))
        stages = make_client_stages(cfg, update, cohort[self.client_id], identity_key=self.key,
                                    used_sessions=self.used, operator=self.operator,
                                    num_examples=report.get("num_examples"),  # only used by weighted rounds
                                    graph_nonce=nonce)
        self._save_used()  # durable before any key of this session leaves the client
        sent = public_report(report, rid)  # round id, ε/δ/accountant, status: nothing about the data or update
        report = save_local_report(self.state, rid, report, sent)["report"]  # the full report stays on the site
        r = self.http.post_json(f"/v1/round/{rid}/report", sent, round_id=rid)
        if r.status != 200:
            self.log(f"round {rid}: report refused ({r.status}): {r.content[:200]!r}")
        deadlines = cfg.get("deadlines", {})
        for stage in stages.stages:
            if die_at == stage:
                os._exit(17)  # test hook: crash mid-round
            limit = time.monotonic() + 3 * float(deadlines.get(stage, 60)) + 30
            msg = self._poll(rid, stage, limit)
            if msg is None:
                return None
            self.evidence.server_message(rid, stage, msg)
            try:
                out = stages.step(stage, msg)
            except (ProtocolAbort, SecurityError) as exc:
                self.evidence.abort(rid, stage, str(exc))
                raise
            self.evidence.sent(rid, stage, out)
            r = self.post_stage(rid, stage, out)
            if r.status != 200:
                self.log(f"round {rid}: {stage} refused ({r.status}): {r.content[:200]!r}")
                return None
        return report

    def post_stage(self, rid: int, stage: str, msg: dict):
        """Send our ``stage`` message: one body, or a resumable chunked upload above the threshold
        (progress logged at each quarter)."""
        quarter = [0]

        def progress(done: int, total: int) -> None:
            q = 4 * done // total
            if q > quarter[0]:
                quarter[0] = q
                self.log(f"round {rid}: {stage} upload {done}/{total} bytes held by the server")

        return post_stage_message(self.http, rid, stage, msg, self.upload_threshold, progress=progress)


def join_federation(enrol_dir, state_dir, train_fn: TrainFn | None, server_url: str | None = None,
                    log: Callable[[str], None] | None = None, die_at: tuple[int, str] | None = None,
                    max_wait_s: float = 900.0,
                    setup: Callable[[ClientSession], TrainFn] | None = None,
                    upload_threshold: int = DEFAULT_THRESHOLD, policy: ClientPolicy | None = None,
                    retry_s: float = 120.0) -> JoinResult:
    """Enrol if needed and take part in rounds until the server says the federation is finished.

    ``setup(session)`` (optional, used when ``train_fn`` is None) runs once after enrolment and
    returns the train_fn, e.g. after fetching and verifying the proxy bundle over the session.
    A training failure (budget exhausted, NaN loss, config refused) drops this client from the
    round, nothing is sent; an exhausted privacy budget also ends its participation. Stage
    messages above ``upload_threshold`` bytes are sent as resumable chunked uploads. A round config
    that breaks ``policy`` (default: the safe :class:`ClientPolicy`) or fails its signature check
    ends participation with :class:`PolicyViolation` / ``SecurityError`` before anything is trained
    or sent; the refusal is in ``state_dir/audit.jsonl``. A server unreachable for ``retry_s`` seconds
    ends it with one :class:`ServerUnreachable` line naming the URL. Each round's full report stays in
    ``state_dir/reports/``; the server gets only :func:`public_report` (round, ε, δ, accountant, status).
    """
    from fedproxy_secure.errors import FedProxyError, PrivacyBudgetExceeded

    s = ClientSession(enrol_dir, state_dir, server_url, log=log, upload_threshold=upload_threshold, policy=policy,
                      retry_s=retry_s)
    try:
        cid = s.enroll()
        res = JoinResult(cid)
        if train_fn is None:
            if setup is None:
                raise ValueError("join_federation: give train_fn or setup")
            train_fn = setup(s)
        tried: set[int] = set()
        t_end = time.monotonic() + max_wait_s
        while time.monotonic() < t_end:
            fed = s.federation()
            if fed["finished"]:
                break
            rid = fed["round"]
            if fed["status"] != "open" or fed["stage"] != "join" or rid in tried:
                time.sleep(0.2)
                continue
            tried.add(rid)
            kill = die_at[1] if die_at and die_at[0] == rid else None
            stop = False
            try:
                rep = s.run_round(rid, train_fn, die_at=kill)
            except ProtocolAbort as exc:
                (log or print)(f"round {rid}: aborted by this client: {exc}")
                rep = None
            except PrivacyBudgetExceeded as exc:
                (log or print)(f"round {rid}: not training: {exc}")
                rep, stop = None, True
            except (SecurityError, ServerUnreachable):
                raise
            except FedProxyError as exc:  # TrainingAborted, ConfigError, ModelError: nothing is sent
                (log or print)(f"round {rid}: training failed, nothing sent: {exc}")
                rep = None
            if rep is None:
                res.rounds_dropped.append(rid)
            else:
                res.rounds_done.append(rid)
                res.reports.append(rep)
                (log or (lambda _m: None))(f"round {rid}: submitted")
            if stop:
                break
        return res
    finally:
        s.close()


def synthetic_train_fn(seed: int, scale: float = 0.1) -> TrainFn:
    """A deterministic fake trainer for tests and load runs: update = scale * N(0,1) of the round's seed."""
    def fn(theta: np.ndarray, cfg: dict) -> tuple[np.ndarray, dict]:
        rng = np.random.default_rng([seed, int(cfg["round_id"])])
        return scale * rng.standard_normal(theta.shape[0]), {"examples": 1, "epsilon": None}
    return fn
