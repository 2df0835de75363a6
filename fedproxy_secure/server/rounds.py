"""The round state machine of the networked federation.

A round moves through ``join`` (clients check in; the cohort is fixed and the signed round config
published), then the stages of the secure-aggregation mode (``advertise``, ``share``,
``masked_input``, ``consistency``, ``unmask`` for masking; ``he_keys``, ``he_input``, ``he_decrypt``
for HE, see ``server/he_stages.py``), then ``done`` or ``aborted``. With ``aggregator: sa_hties``
the round runs those stages twice, as two complete secure-sum sessions (phase A, an optional
``sa_reveal`` stage, phase B as ``b_<stage>``; ``server/sa_hties_stages.py``). Each stage
has a deadline: it closes early when every live cohort member has submitted, else at the
deadline, and a client that sent nothing is declared dropped (audited). Fewer than ``t`` live
clients aborts the round (nothing is revealed). Every transition is committed to the store
before it is acted on; :meth:`RoundEngine.recover` resumes an open round after a crash by
replaying the stored messages, or aborts it, and the next round always gets a fresh session id.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from fedproxy_secure.audit.log import AuditLog, canonical_json
from fedproxy_secure.errors import ConfigError, DataError, ProtocolAbort, SecurityError
from fedproxy_secure.server.protocols import PlainStages, make_server_stages
from fedproxy_secure.server.store import RoundRow, Storage

ROUND_CONFIG_DOMAIN = b"fedproxy-secure/v1/round-config\n"
DEFAULT_DEADLINES = {"join": 30.0, "advertise": 120.0, "share": 20.0, "masked_input": 20.0,
                     "consistency": 20.0, "unmask": 20.0, "he_keys": 120.0, "he_input": 30.0, "he_decrypt": 60.0,
                     "sa_reveal": 20.0}
#: rules the server can apply to secure sums only (hties/ties need every update in the clear)
NET_AGGREGATORS = ("fedavg", "sa_hties")


@dataclass
class FederationSettings:
    """What the operator fixes for a federation (stored in the store's meta table as JSON)."""

    rounds: int = 3
    min_clients: int = 3
    threshold: int = 2
    mode: str = "masking"
    dim: int = 16
    clip_norm: float = 1.0
    aggregator: str = "fedavg"
    deadlines: dict = field(default_factory=lambda: dict(DEFAULT_DEADLINES))
    train: dict = field(default_factory=dict)   # passed to clients verbatim (lr, epochs, dp, ...)
    max_aborts: int = 10
    on_restart: str = "resume"                  # resume | abort
    a_seed: int | None = None                   # fixed LoRA-A seed of the federation (FFA-LoRA needs one A)
    he: dict = field(default_factory=dict)      # mode he: CKKS options (server/he_stages.he_settings)
    sa_hties: dict = field(default_factory=dict)  # aggregator sa_hties: h_norm, r0, delta, rho (sa_hties_stages)

    def validate(self) -> "FederationSettings":
        """Raise ``ConfigError`` naming the field for any impossible value."""
        if self.rounds < 1:
            raise ConfigError(f"federation.rounds={self.rounds}: must be >= 1")
        if self.min_clients < 2:
            raise ConfigError(f"federation.min_clients={self.min_clients}: secure aggregation needs >= 2")
        if not 1 <= self.threshold <= self.min_clients:
            raise ConfigError(f"federation.threshold={self.threshold}: must be in [1, min_clients]")
        if self.mode not in ("masking", "plain", "none", "he"):
            raise ConfigError(f"federation.mode={self.mode!r}: use masking, he or plain over the network")
        if self.dim < 1 or not self.clip_norm > 0:
            raise ConfigError("federation.dim and federation.clip_norm must be positive")
        if self.on_restart not in ("resume", "abort"):
            raise ConfigError("federation.on_restart: use resume or abort")
        if self.a_seed is not None and not (isinstance(self.a_seed, int) and 0 <= self.a_seed < 2**63):
            raise ConfigError(f"federation.a_seed={self.a_seed!r}: use an integer in [0, 2**63)")
        if self.mode == "he":
            from fedproxy_secure.server.he_stages import he_settings

            he_settings(self.he, self.clip_norm)
        elif self.he:
            raise ConfigError(f"federation.he is set but federation.mode is {self.mode!r}; remove it or use mode he")
        if self.aggregator not in NET_AGGREGATORS:
            raise ConfigError(f"federation.aggregator={self.aggregator!r}: over the network use one of "
                              f"{list(NET_AGGREGATORS)} (ties/hties need every update in the clear)")
        if self.aggregator == "sa_hties":
            from fedproxy_secure.server.sa_hties_stages import MIN_COHORT, NET_MODES, sa_options

            if self.mode not in NET_MODES:
                raise ConfigError(f"federation.aggregator sa_hties with federation.mode={self.mode!r} is not wired "
                                  "to the network yet; use mode masking")
            if self.min_clients < MIN_COHORT:
                raise ConfigError(f"federation.min_clients={self.min_clients}: SA-H-TIES needs >= {MIN_COHORT} (with 2 "
                                  "clients the broadcast phase-A sum reveals the other client's update direction)")
            sa_options(self.sa_hties)
        elif self.sa_hties:
            raise ConfigError(f"federation.sa_hties is set but federation.aggregator is {self.aggregator!r}; "
                              "remove it or use aggregator sa_hties")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "FederationSettings":
        """Build from a dict, refusing unknown keys."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"federation: unknown keys {sorted(unknown)}")
        s = cls(**d)
        s.deadlines = {**DEFAULT_DEADLINES, **(s.deadlines or {})}
        return s.validate()


def state_to_bytes(theta: np.ndarray, conflict: np.ndarray | None = None) -> bytes:
    """Global state as safetensors bytes (``theta`` and optional ``conflict``, float64)."""
    from safetensors.numpy import save

    t = {"theta": np.ascontiguousarray(theta, dtype=np.float64)}
    if conflict is not None:
        t["conflict"] = np.ascontiguousarray(conflict, dtype=np.float64)
    return save(t)


def state_from_bytes(blob: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`state_to_bytes` (safetensors only, never pickle)."""
    from safetensors.numpy import load

    return load(blob)


class RoundEngine:
    """Drives rounds over a :class:`Storage`; thread-safe (one lock around every transition)."""

    def __init__(self, store: Storage, audit: AuditLog, settings: FederationSettings,
                 signer=None, clock: Callable[[], float] = time.time, he_key=None) -> None:
        """``he_key``: the server's Ed25519 key that signs HE contribution statements (mode he only)."""
        self.store, self.audit, self.s, self.signer, self.clock = store, audit, settings, signer, clock
        if settings.mode == "he" and he_key is None:
            raise ConfigError("federation.mode he: the server needs its HE statement key (keys/he_statement.key)")
        self.he_key = he_key
        self.lock = threading.RLock()
        self._proto = None          # ServerStages of the open round (rebuilt on recovery)
        self._proto_round = None

    # ---------------------------------------------------------------- helpers
    def stages_for(self, mode: str) -> tuple[str, ...]:
        """Protocol stages of ``mode`` (after ``join``)."""
        if mode in ("plain", "none"):
            return PlainStages.stages
        if mode == "he":
            from fedproxy_secure.server.he_stages import HE_STAGES

            return HE_STAGES
        from fedproxy_secure.server.masking_stages import MaskingServerStages

        return MaskingServerStages.stages

    def round_stages(self) -> tuple[str, ...]:
        """Every stage of a round after ``join``: the mode's, or SA-H-TIES's two phases over them."""
        base = self.stages_for(self.s.mode)
        if self.s.aggregator != "sa_hties":
            return base
        from fedproxy_secure.server.sa_hties_stages import round_stages, sa_options

        return round_stages(base, sa_options(self.s.sa_hties).h_norm)

    def _deadline(self, stage: str) -> float:
        from fedproxy_secure.server.sa_hties_stages import base_stage

        d = self.s.deadlines
        return self.clock() + float(d.get(stage, d.get(base_stage(stage), 30.0)))

    def completed_rounds(self) -> int:
        """Rounds closed as done."""
        return sum(1 for r in self.store.rounds() if r.status == "done")

    def finished(self) -> bool:
        """True once the federation has run all its rounds (or too many aborts)."""
        if self.completed_rounds() >= self.s.rounds:
            return True
        return sum(1 for r in self.store.rounds() if r.status == "aborted") > self.s.max_aborts

    def ensure_initial_state(self) -> None:
        """Store the round-0 global state (zeros) if there is none."""
        if self.store.global_state() is None:
            self.store.put_global_state(0, state_to_bytes(np.zeros(self.s.dim)))

    # ---------------------------------------------------------------- round lifecycle
    def open_round(self) -> RoundRow | None:
        """Open the next round (fresh random session id) unless the federation is finished."""
        with self.lock:
            if self.finished():
                return None
            last = self.store.latest_round()
            if last is not None and last.status == "open":
                return last
            rid = (last.round_id + 1) if last else 1
            session = secrets.token_bytes(32)
            self.store.open_round(rid, session.hex(), "join", self._deadline("join"), {})
            self.audit.append("round_open", {"round": rid, "session_sha256": hashlib.sha256(session).hexdigest()})
            self._proto, self._proto_round = None, None
            return self.store.get_round(rid)

    def abort(self, rid: int, reason: str) -> None:
        """Abort round ``rid`` (durably, then audited) and open the next one."""
        with self.lock:
            gone = self.store.close_round(rid, "aborted", reason, None, None)
            self.audit.append("round_abort", {"round": rid, "reason": reason})
            self._audit_discarded(gone, "round aborted")
            self._proto, self._proto_round = None, None
            self.open_round()

    def current(self) -> RoundRow | None:
        """The latest round."""
        return self.store.latest_round()

    def _cohort(self, row: RoundRow) -> dict[str, int]:
        return {c: i for c, i in row.config.get("cohort", [])}

    def _threshold(self, n: int) -> int:
        if self.s.mode == "masking":
            return max(self.s.threshold, n // 2 + 1, 2)
        if self.s.mode == "he":  # a "sum" of one update would be that update, decrypted
            return max(self.s.threshold, 2)
        return self.s.threshold

    def _threshold_for(self, n: int) -> int:
        """The round's threshold; SA-H-TIES broadcasts the phase-A sum, so it needs t >= 3."""
        t = self._threshold(n)
        if self.s.aggregator == "sa_hties":
            from fedproxy_secure.server.sa_hties_stages import MIN_COHORT

            t = max(t, MIN_COHORT)
        return t

    def _phase_signer(self, body: dict) -> dict:
        from fedproxy_secure.server.sa_hties_stages import PHASE_DOMAIN

        return self.signer(body, PHASE_DOMAIN) if self.signer is not None else body

    def _build_proto(self, row: RoundRow):
        cfg = row.config
        cohort = sorted(i for _, i in cfg["cohort"])
        if self.s.aggregator == "sa_hties":
            from fedproxy_secure.server.sa_hties_stages import SAHTiesServerStages, sa_options

            sa = cfg["sa_hties"]
            return SAHTiesServerStages(mode=self.s.mode, round_id=row.round_id, cohort=cohort, dim=self.s.dim,
                                       threshold=cfg["threshold"], session_id=bytes.fromhex(row.session_id),
                                       session_b=bytes.fromhex(sa["session_id_b"]), options=cfg.get("secagg_options", {}),
                                       sa=sa_options({k: v for k, v in sa.items() if k != "session_id_b"}),
                                       signer=self._phase_signer)
        return make_server_stages(self.s.mode, cohort=cohort, dim=self.s.dim, threshold=cfg["threshold"],
                                  session_id=bytes.fromhex(row.session_id), clip_norm=self.s.clip_norm,
                                  options=cfg.get("secagg_options", {}), signing_key=self.he_key)

    # ---------------------------------------------------------------- client actions
    def submit(self, client_id: str, rid: int, stage: str, msg: dict, raw_sha256: str | None = None) -> dict:
        """Accept a client's message for ``stage`` of round ``rid`` (durably), or raise.

        ``raw_sha256``: SHA-256 of the bytes as received (an upload declared with that hash is
        marked committed with the submission). Raises ``SecurityError``/``ProtocolAbort`` with the
        reason; the caller maps to HTTP.
        """
        with self.lock:
            row = self.store.get_round(rid)
            if row is not None:  # idempotent retry (reply lost, e.g. across a server restart)
                prev = self.store.submissions(rid, stage).get(client_id)
                if prev is not None:
                    if prev == canonical_json(msg):
                        return {"accepted": True, "round": rid, "stage": stage, "duplicate": True}
                    raise LookupError(f"a different message was already accepted for round {rid} stage {stage}")
            row = self.admissible(client_id, rid, stage)
            if stage == "join":
                if not isinstance(msg, dict) or set(msg) - {"type", "epsilon_spent"}:
                    raise ProtocolAbort("join: unexpected fields")
            else:
                self._validate(stage, msg, self._cohort(row)[client_id], row)
            body = canonical_json(msg)
            if not self.store.add_submission(rid, stage, client_id, body, raw_sha256=raw_sha256):
                raise LookupError(f"duplicate submission for round {rid} stage {stage}")
            self.audit.append("accept", {"round": rid, "stage": stage, "client": client_id,
                                         "sha256": hashlib.sha256(body).hexdigest()})
            self.tick()
            return {"accepted": True, "round": rid, "stage": stage}

    def admissible(self, client_id: str, rid: int, stage: str) -> RoundRow:
        """The open round ``rid`` if ``client_id`` may send its message for ``stage`` now.

        Raises ``LookupError`` (round not open, another stage current) or ``PermissionError``
        (not in the cohort, declared dropped). Used on submission and when an upload is declared.
        """
        row = self.store.get_round(rid)
        if row is None or row.status != "open":
            raise LookupError(f"round {rid} is not open")
        if stage != row.stage:
            raise LookupError(f"round {rid} is at stage {row.stage!r}, not {stage!r}")
        if stage != "join":
            if client_id not in self._cohort(row):
                raise PermissionError(f"client {client_id} is not in the cohort of round {rid}")
            if client_id not in self._alive(row):
                raise PermissionError(f"client {client_id} was declared dropped in round {rid}")
        return row

    def _validate(self, stage: str, msg: dict, sid: int, row: RoundRow) -> None:
        if self.s.aggregator == "sa_hties":
            from fedproxy_secure.server.sa_hties_stages import validate_message

            validate_message(self.s.mode, stage, msg, sid, bytes.fromhex(row.session_id),
                             bytes.fromhex(row.config["sa_hties"]["session_id_b"]), self.s.dim)
            return
        if self.s.mode in ("plain", "none"):
            PlainStages.validate(stage, msg, self.s.dim)
            return
        if self.s.mode == "he":  # full check (signatures, envelope parse) against the replayed session state
            self._proto_for(row).validate(stage, msg, sid)
            return
        from fedproxy_secure.server.masking_stages import MaskingServerStages

        MaskingServerStages.validate(stage, msg, sid, bytes.fromhex(row.session_id))

    def _alive(self, row: RoundRow) -> set[str]:
        """Cohort members not yet declared dropped in ``row``."""
        alive = set(self._cohort(row))
        for t in self.store.transitions(row.round_id):
            alive -= set(t["data"].get("dropped", []))
        return alive

    def fetch(self, client_id: str, rid: int, stage: str) -> tuple[str, dict | None]:
        """The server's message to ``client_id`` for ``stage``: ("ready", msg) | ("wait", None) | ("gone", reason)."""
        row = self.store.get_round(rid)
        if row is None:
            return "gone", {"reason": f"no round {rid}"}
        if row.status == "aborted":
            return "gone", {"reason": f"round aborted: {row.reason}"}
        if stage == "config":
            if row.config.get("cohort") is None:
                return ("wait", None) if row.status == "open" else ("gone", {"reason": "round closed"})
            return "ready", row.config
        if stage == "result":
            if row.status == "done":
                return "ready", row.result
            return "wait", None
        cohort = self._cohort(row)
        if cohort and client_id not in cohort:
            return "gone", {"reason": "not in the cohort of this round"}
        out = self.store.submissions(rid, "out:" + stage)
        if client_id in out:
            return "ready", json.loads(out[client_id])
        if cohort and client_id not in self._alive(row):
            return "gone", {"reason": "declared dropped"}
        return "wait", None

    # ---------------------------------------------------------------- the clock
    def tick(self) -> None:
        """Close the current stage if everyone live submitted or its deadline passed; open rounds."""
        with self.lock:
            row = self.store.latest_round()
            if row is None or row.status != "open":
                self.open_round()
                return
            subs = self.store.submissions(row.round_id, row.stage)
            now = self.clock()
            if row.stage == "join":
                active = {c["client_id"] for c in self.store.clients() if c["status"] == "active"}
                everyone = len(subs) >= max(len(active), self.s.min_clients)
                if everyone or (now >= row.stage_deadline and len(subs) >= self.s.min_clients):
                    self._close_join(row, subs)
                elif now >= row.stage_deadline:
                    self.abort(row.round_id, f"only {len(subs)} clients joined by the deadline, need {self.s.min_clients}")
                return
            alive = self._alive(row)
            if set(subs) >= alive or now >= row.stage_deadline:
                self._close_stage(row, subs, alive)

    def _close_join(self, row: RoundRow, subs: dict[str, bytes]) -> None:
        members = sorted(subs)
        cohort = [[c, i + 1] for i, c in enumerate(members)]
        n = len(cohort)
        t = self._threshold_for(n)
        gs = self.store.global_state()
        assert gs is not None
        cfg = {
            "round_id": row.round_id, "session_id": row.session_id, "cohort": cohort,
            "state_round": gs[0], "state_sha256": hashlib.sha256(gs[1]).hexdigest(),
            "aggregator": self.s.aggregator, "mode": self.s.mode, "threshold": t, "dim": self.s.dim,
            "clip_norm": self.s.clip_norm, "train": self.s.train, "deadlines": self.s.deadlines,
            "a_seed": self.s.a_seed if self.s.a_seed is not None else
            int.from_bytes(hashlib.sha256(b"a-seed" + bytes.fromhex(row.session_id)).digest()[:4], "big"),
            "total_rounds": self.s.rounds, "issued_at": int(self.clock()),
            "secagg_options": {"identities": {str(i): base64.b64encode(self.store.client_key(c)).decode()
                                              for c, i in cohort},
                               "max_clients": max(n, 2)},
        }
        if self.s.mode == "he":
            from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

            from fedproxy_secure.server.he_stages import he_settings, key_holder_for

            he = he_settings(self.s.he, self.s.clip_norm)
            if n > he["max_clients"]:
                self.abort(row.round_id, f"cohort of {n} exceeds federation.he.max_clients={he['max_clients']}")
                return
            pub = self.he_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            he.update(key_holder=key_holder_for(row.round_id, n), statement_key=base64.b64encode(pub).decode())
            cfg["secagg_options"]["he"] = he
        if self.s.aggregator == "sa_hties":
            from fedproxy_secure.server.sa_hties_stages import sa_options

            session_b = secrets.token_bytes(32)  # phase B: a fresh session (never the phase-A id, never reused)
            while session_b == bytes.fromhex(row.session_id):
                session_b = secrets.token_bytes(32)
            cfg["sa_hties"] = {**sa_options(self.s.sa_hties).model_dump(), "session_id_b": session_b.hex()}
        if self.signer is not None:
            cfg = self.signer(cfg)
        first = self.round_stages()[0]
        outbox = {c: b"{}" for c in members}
        gone = self.store.advance_stage(row.round_id, first, self._deadline(first),
                                        {"cohort": members, "threshold": t}, outbox=outbox, config=cfg)
        self._audit_discarded(gone, "stage join closed")
        self.audit.append("cohort", {"round": row.round_id, "clients": members, "threshold": t})
        self._proto, self._proto_round = None, None

    def _audit_discarded(self, uploads: list[dict], why: str) -> None:
        for u in uploads or ():
            self.audit.append("upload_discard", {**u, "reason": why})

    def _proto_for(self, row: RoundRow):
        if self._proto is None or self._proto_round != row.round_id:
            self._proto = self._replay(row)
            self._proto_round = row.round_id
        return self._proto

    def _replay(self, row: RoundRow):
        """Fresh server stages for ``row`` with every closed stage replayed from the store."""
        proto = self._build_proto(row)
        cohort = self._cohort(row)
        stages = self.round_stages()
        for st in stages[: stages.index(row.stage)]:
            subs = self.store.submissions(row.round_id, st)
            proto.close(st, {cohort[c]: json.loads(b) for c, b in subs.items()})
        return proto

    def _close_stage(self, row: RoundRow, subs: dict[str, bytes], alive: set[str]) -> None:
        rid, stage = row.round_id, row.stage
        cohort = self._cohort(row)
        got = {c: b for c, b in subs.items() if c in alive}
        dropped = sorted(alive - set(got))
        for c in dropped:
            self.audit.append("dropout", {"round": rid, "stage": stage, "client": c})
        t = row.config["threshold"]
        if len(got) < t:
            self.abort(rid, f"only {len(got)} clients alive at stage {stage}, threshold {t}")
            return
        try:
            proto = self._proto_for(row)
            out = proto.close(stage, {cohort[c]: json.loads(b) for c, b in got.items()})
        except (ProtocolAbort, SecurityError, ValueError) as exc:
            self.abort(rid, f"stage {stage} failed: {exc}")
            return
        stages = self.round_stages()
        if out is None:
            self._finish(row, proto, dropped)
            return
        nxt = stages[stages.index(stage) + 1]
        by_sid = {i: c for c, i in cohort.items()}
        outbox = {by_sid[i]: canonical_json(m) for i, m in out.items()}
        refused = sorted(c for c in got if c not in outbox)  # messages the protocol rejected
        reasons = getattr(proto, "rejections", {})
        for c in refused:
            self.audit.append("reject", {"round": rid, "stage": stage, "client": c,
                                         "reason": reasons.get(cohort[c], "message refused by the "
                                                               "secure-aggregation protocol")[:300]})
        dropped = sorted(set(dropped) | set(refused))
        gone = self.store.advance_stage(rid, nxt, self._deadline(nxt), {"dropped": dropped, "closed": stage},
                                        outbox=outbox)
        self._audit_discarded(gone, f"stage {stage} closed")
        self.audit.append("stage", {"round": rid, "closed": stage, "next": nxt, "alive": len(got),
                                    "dropped": dropped})

    def _finish(self, row: RoundRow, proto, dropped: list[str]) -> None:
        if self.s.aggregator == "sa_hties":
            self._finish_sa_hties(row, proto, dropped)
            return
        rid = row.round_id
        total, survivors = proto.result()
        by_sid = {i: c for c, i in self._cohort(row).items()}
        surv_ids = [by_sid[i] for i in survivors]
        gs = self.store.global_state()
        theta = state_from_bytes(gs[1])["theta"]
        k = len(survivors)
        delta = total / k  # FedAvg over survivors: the only rule that needs just the sum
        new_theta = theta + delta
        norm = float(np.linalg.norm(total))
        if norm > k * self.s.clip_norm * (1 + 1e-3) + 1e-6:
            self.abort(rid, f"aggregate norm {norm:.4g} exceeds {k} x clip norm: refusing the update")
            return
        result = {"survivors": surv_ids, "dropped_last_stage": dropped, "sum_sha256":
                  hashlib.sha256(np.ascontiguousarray(total, dtype="<f8").tobytes()).hexdigest(),
                  "sum_b64": base64.b64encode(np.ascontiguousarray(total, dtype="<f8").tobytes()).decode(),
                  "aggregate_norm": norm, "delta_norm": float(np.linalg.norm(delta))}
        if hasattr(proto, "result_info"):
            info = proto.result_info()
            if "key_holder_sid" in info:
                info["key_holder"] = by_sid.get(info["key_holder_sid"])
            result["he"] = info
        blob = state_to_bytes(new_theta)
        gone = self.store.close_round(rid, "done", "ok", result, blob)
        self._audit_discarded(gone, "round closed")
        self.audit.append("round_close", {"round": rid, "survivors": surv_ids,
                                          "state_sha256": hashlib.sha256(blob).hexdigest(),
                                          "aggregate_norm": norm})
        self._proto, self._proto_round = None, None
        if self.finished():
            self.audit.append("federation_end", {"rounds_done": self.completed_rounds()})
        else:
            self.open_round()

    def _finish_sa_hties(self, row: RoundRow, proto, dropped: list[str]) -> None:
        """Close an SA-H-TIES round: Δ* and C from the two phases' sums; θ += Δ*, C kept in the state."""
        rid = row.round_id
        try:
            delta, conflict, info, surv_b = proto.global_step(self.s.clip_norm)
        except (ProtocolAbort, DataError, ValueError) as exc:
            self.abort(rid, f"SA-H-TIES finish failed: {exc}")
            return
        by_sid = {i: c for c, i in self._cohort(row).items()}
        surv_ids = [by_sid[i] for i in surv_b]
        info["phase_a_survivors"] = [by_sid[i] for i in info["phase_a_survivors_sid"]]
        theta = state_from_bytes(self.store.global_state()[1])["theta"]
        d = np.ascontiguousarray(delta, dtype="<f8").tobytes()
        result = {"survivors": surv_ids, "dropped_last_stage": dropped, "sa_hties": info,
                  "delta_sha256": hashlib.sha256(d).hexdigest(), "delta_b64": base64.b64encode(d).decode(),
                  "delta_norm": float(np.linalg.norm(delta))}
        blob = state_to_bytes(theta + delta, conflict)
        gone = self.store.close_round(rid, "done", "ok", result, blob)
        self._audit_discarded(gone, "round closed")
        self.audit.append("round_close", {"round": rid, "survivors": surv_ids, "aggregator": "sa_hties",
                                          "phase_a_survivors": info["phase_a_survivors"],
                                          "state_sha256": hashlib.sha256(blob).hexdigest(),
                                          "delta_norm": result["delta_norm"]})
        self._proto, self._proto_round = None, None
        if self.finished():
            self.audit.append("federation_end", {"rounds_done": self.completed_rounds()})
        else:
            self.open_round()

    # ---------------------------------------------------------------- restart
    def recover(self) -> None:
        """After a (possibly unclean) restart: resume or abort the open round, with fresh deadlines."""
        with self.lock:
            self.ensure_initial_state()
            row = self.store.latest_round()
            if row is None:
                self.audit.append("federation_start", {"settings": asdict(self.s)})
                self.open_round()
                return
            if row.status != "open":
                if not self.finished():
                    self.open_round()
                return
            if self.s.on_restart == "abort":
                self.abort(row.round_id, "server restarted (on_restart=abort)")
                return
            try:
                if row.stage != "join":
                    self._proto = self._replay(row)
                    self._proto_round = row.round_id
                gone = self.store.advance_stage(row.round_id, row.stage, self._deadline(row.stage),
                                                {"resumed": True})
                self._audit_discarded(gone, "stage closed before the restart")
                self.audit.append("round_resume", {"round": row.round_id, "stage": row.stage})
            except Exception as exc:  # any replay failure: abort cleanly, fresh keys next round
                self.abort(row.round_id, f"server restarted and could not resume: {exc}")


def sign_round_config(key, cfg: dict, domain: bytes = ROUND_CONFIG_DOMAIN) -> dict:
    """Return ``cfg`` plus ``kid`` and ``signature`` (Ed25519 over the canonical JSON of the rest).

    ``domain`` separates round configs from other operator-signed messages (SA-H-TIES phases).
    """
    from fedproxy_secure.artifacts.keys import key_id, sign

    body = dict(cfg)
    body["kid"] = key_id(key)
    sig = sign(key, domain, canonical_json(body))
    return {**body, "signature": base64.b64encode(sig).decode()}


def verify_round_config(pub, cfg: dict, domain: bytes = ROUND_CONFIG_DOMAIN) -> dict:
    """Check the operator's signature on a round config; returns it without the signature.

    Raises ``SecurityError`` on a missing/bad signature or a key id other than ``pub``'s.
    """
    from fedproxy_secure.artifacts.keys import key_id, verify_signature

    if not isinstance(cfg, dict) or "signature" not in cfg or "kid" not in cfg:
        raise SecurityError("round config is not signed")
    body = {k: v for k, v in cfg.items() if k != "signature"}
    if body["kid"] != key_id(pub):
        raise SecurityError(f"round config signed by unknown key {str(body['kid'])[:16]}")
    try:
        sig = base64.b64decode(cfg["signature"], validate=True)
    except (ValueError, TypeError):
        raise SecurityError("round config signature is not base64") from None
    if not verify_signature(pub, sig, domain, canonical_json(body)):
        raise SecurityError("round config signature does not verify")
    return body
