"""The round engine of the networked federation: one loop for every secure-aggregation mode.

A round moves through ``join`` (clients check in; the cohort is fixed and the signed round config
published), then the stages of its mode (:mod:`fedproxy_secure.protocol.modes`: plain, masking,
HE, or a composite such as SA-H-TIES = two secure sums), then ``done`` or ``aborted``. The engine
knows modes only through the :class:`~fedproxy_secure.protocol.modes.Mode` interface (stages,
deadlines, threshold, round options, server stages, ``finish``); it never branches on a mode name.
Each stage has a deadline: it closes early when every live cohort member has submitted, else at
the deadline, and a client that sent nothing is declared dropped (audited); a message the mode
refuses is audited as ``reject`` with the mode's reason. Fewer than ``t`` live clients aborts the
round (nothing is revealed). Every transition is committed to the store before it is acted on;
:meth:`RoundEngine.recover` resumes an open round after a crash by replaying the stored messages,
or aborts it, and the next round always gets a fresh session id.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import asdict
from typing import Callable

import numpy as np
from safetensors.numpy import save as safetensors_save

from fedproxy_secure.aggregate.server_opt import global_step, state_arrays, state_from_arrays
from fedproxy_secure.auditlog import AuditLog
from fedproxy_secure.errors import DataError, ProtocolAbort, SecurityError
from fedproxy_secure.wire.canonical import canonical_json
from fedproxy_secure.wire.codec import b64e
from fedproxy_secure.protocol.modes import RoundContext, ServerStages, resolve
from fedproxy_secure.protocol.names import JOIN_STAGE, ROUND_CONFIG_DOMAIN
from fedproxy_secure.protocol.roundcfg import sign_round_config, state_from_bytes, state_to_bytes, verify_round_config
from fedproxy_secure.protocol.settings import DEFAULT_DEADLINES, FederationSettings, net_aggregators
from fedproxy_secure.server.store import RoundRow, Storage

#: re-exported for operator code written against the old location; new code imports from protocol
__all__ = ["RoundEngine", "FederationSettings", "DEFAULT_DEADLINES", "NET_AGGREGATORS", "ROUND_CONFIG_DOMAIN",
           "sign_round_config", "verify_round_config", "state_to_bytes", "state_from_bytes"]
#: rules the server can apply to secure sums only (hties/ties need every update in the clear)
NET_AGGREGATORS = net_aggregators()


class RoundEngine:
    """Drives rounds over a :class:`Storage`; thread-safe (one lock around every transition)."""

    def __init__(self, store: Storage, audit: AuditLog, settings: FederationSettings,
                 signer=None, clock: Callable[[], float] = time.time, he_key=None) -> None:
        """``he_key``: the server's Ed25519 key that signs HE contribution statements (modes that need one)."""
        self.store, self.audit, self.s, self.signer, self.clock = store, audit, settings, signer, clock
        self.mode = resolve(settings.mode, settings.aggregator)  # the one place a mode is looked up
        self.mode.check_server(he_key)
        self.he_key = he_key
        self.lock = threading.RLock()
        self._proto: ServerStages | None = None  # server stages of the open round (rebuilt on recovery)
        self._proto_round: int | None = None

    # ---------------------------------------------------------------- helpers
    def round_stages(self) -> tuple[str, ...]:
        """Every stage of a round after ``join`` (the mode's)."""
        return self.mode.stages(self.s)

    def stage_names(self) -> tuple[str, ...]:
        """Every stage a client may post or fetch in this federation: ``join`` and the mode's stages."""
        return (JOIN_STAGE,) + self.round_stages()

    def _deadline(self, stage: str) -> float:
        if stage == JOIN_STAGE:
            return self.clock() + float(self.s.deadlines.get(JOIN_STAGE, 30.0))
        return self.clock() + self.mode.deadline(self.s, stage)

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

    def _phase_signer(self, body: dict, domain: bytes) -> dict:
        return self.signer(body, domain) if self.signer is not None else body

    def _build_proto(self, row: RoundRow) -> ServerStages:
        return self.mode.server_stages(RoundContext(config=row.config, dim=self.s.wire_dim(),
                                                    clip_norm=self.s.clip_norm, he_key=self.he_key,
                                                    phase_signer=self._phase_signer))

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
                if not isinstance(msg, dict) or set(msg) - {"type", "epsilon_spent", "graph_commit"}:
                    raise ProtocolAbort("join: unexpected fields")
                gc = msg.get("graph_commit")
                if gc is not None and not (isinstance(gc, str) and len(gc) == 64
                                           and all(ch in "0123456789abcdef" for ch in gc)):
                    raise ProtocolAbort("join: graph_commit must be 64 lowercase hex characters")
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
        """Full check of one message against the replayed session state, before it is stored."""
        self._proto_for(row).validate(stage, msg, sid)

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

    def a_seed(self) -> int:
        """The federation's fixed FFA-LoRA A seed, the same in every round: ``settings.a_seed``, else one
        drawn once and kept in the store (meta ``a_seed``), never re-derived per round."""
        if self.s.a_seed is not None:
            return int(self.s.a_seed)
        raw = self.store.get_meta("a_seed")
        if raw is None:
            raw = str(secrets.randbits(62))
            self.store.set_meta("a_seed", raw)
        return int(raw)

    def _close_join(self, row: RoundRow, subs: dict[str, bytes]) -> None:
        members = sorted(subs)
        cohort = [[c, i + 1] for i, c in enumerate(members)]
        n = len(cohort)
        t = self.mode.threshold(self.s, n)
        gs = self.store.global_state()
        assert gs is not None
        cfg = {
            "round_id": row.round_id, "session_id": row.session_id, "cohort": cohort,
            "state_round": gs[0], "state_sha256": hashlib.sha256(gs[1]).hexdigest(),
            "aggregator": self.s.aggregator, "mode": self.s.mode, "threshold": t, "dim": self.s.dim,
            "clip_norm": self.s.clip_norm, "deadlines": self.s.deadlines,
            "train": {**self.s.train, "lr": self.s.client_lr(self.completed_rounds())} if self.s.train else self.s.train,
            **({"weighting": {"by": "examples", "max_examples": self.s.max_examples}}
               if self.s.weighting == "examples" else {}),
            "a_seed": self.a_seed(),
            "total_rounds": self.s.rounds, "issued_at": int(self.clock()),
            "secagg_options": {"identities": {str(i): b64e(self.store.client_key(c)) for c, i in cohort},
                               "max_clients": max(n, 2),
                               # commit-reveal SecAgg+ graph seed (wire/binding.py): fixed before any reveal
                               "graph_commits": self._graph_commits(subs, cohort)},
        }
        try:
            extra = self.mode.round_options(self.s, row.round_id, n, bytes.fromhex(row.session_id), self.he_key)
        except ProtocolAbort as exc:
            self.abort(row.round_id, str(exc))
            return
        for k, v in extra.items():
            cfg[k] = {**cfg[k], **v} if isinstance(cfg.get(k), dict) else v
        if self.signer is not None:
            cfg = self.signer(cfg)
        first = self.round_stages()[0]
        outbox = {c: b"{}" for c in members}
        gone = self.store.advance_stage(row.round_id, first, self._deadline(first),
                                        {"cohort": members, "threshold": t}, outbox=outbox, config=cfg)
        self._audit_discarded(gone, "stage join closed")
        self.audit.append("cohort", {"round": row.round_id, "clients": members, "threshold": t})
        self._proto, self._proto_round = None, None

    @staticmethod
    def _graph_commits(subs: dict[str, bytes], cohort: list[list]) -> dict[str, str]:
        """Each cohort member's ``join`` graph commitment, by secagg id (members that sent none are left out:
        every party then falls back to the complete graph, never to a graph the server could choose)."""
        out = {}
        for c, i in cohort:
            gc = json.loads(subs[c]).get("graph_commit")
            if isinstance(gc, str):
                out[str(i)] = gc
        return out

    def _audit_discarded(self, uploads: list[dict], why: str) -> None:
        for u in uploads or ():
            self.audit.append("upload_discard", {**u, "reason": why})

    def _proto_for(self, row: RoundRow) -> ServerStages:
        if self._proto is None or self._proto_round != row.round_id:
            self._proto = self._replay(row)
            self._proto_round = row.round_id
        return self._proto

    def _replay(self, row: RoundRow) -> ServerStages:
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
            before = set(proto.rejections)
            out = proto.close(stage, {cohort[c]: json.loads(b) for c, b in got.items()})
        except (ProtocolAbort, SecurityError, ValueError) as exc:
            self.abort(rid, f"stage {stage} failed: {exc}")
            return
        by_sid = {i: c for c, i in cohort.items()}
        outbox = {by_sid[i]: canonical_json(m) for i, m in (out or {}).items()}
        # messages the mode refused: recorded in its rejections, or (mid-round) left without a next message
        refused = {by_sid[i] for i in set(proto.rejections) - before if i in by_sid and by_sid[i] in got}
        if out is not None:
            refused |= {c for c in got if c not in outbox}
        for c in sorted(refused):
            self.audit.append("reject", {"round": rid, "stage": stage, "client": c,
                                         "reason": proto.rejections.get(cohort[c], "message refused by the "
                                                                        "secure-aggregation protocol")[:300]})
        dropped = sorted(set(dropped) | refused)
        if out is None:
            self._finish(row, proto, dropped)
            return
        stages = self.round_stages()
        nxt = stages[stages.index(stage) + 1]
        gone = self.store.advance_stage(rid, nxt, self._deadline(nxt), {"dropped": dropped, "closed": stage},
                                        outbox=outbox)
        self._audit_discarded(gone, f"stage {stage} closed")
        self.audit.append("stage", {"round": rid, "closed": stage, "next": nxt, "alive": len(got),
                                    "dropped": dropped})

    def _finish(self, row: RoundRow, proto: ServerStages, dropped: list[str]) -> None:
        """Close the round with the mode's aggregate and the server optimizer's global step
        (:func:`fedproxy_secure.aggregate.server_opt.global_step`, conflict state kept), or abort it."""
        rid = row.round_id
        by_sid = {i: c for c, i in self._cohort(row).items()}
        theta = state_from_bytes(self.store.global_state()[1])["theta"]
        try:
            fin = self.mode.finish(proto, theta, self.s, by_sid)
            stored = self.store.optimizer_state()
            opt_state = state_from_arrays(state_from_bytes(stored[1])) if stored else None
            new_theta, opt_state, step_info = global_step(theta, fin.delta, opt_state, self.s.optimizer(),
                                                          self.completed_rounds(), self.s.rounds)
        except (ProtocolAbort, DataError, ValueError) as exc:
            self.abort(rid, str(exc) if isinstance(exc, ProtocolAbort) else f"finish failed: {exc}")
            return
        surv_ids = [by_sid[i] for i in fin.survivors]
        result = {"survivors": surv_ids, "dropped_last_stage": dropped, **fin.result, "server_step": step_info}
        blob = state_to_bytes(new_theta, fin.conflict)
        stateful = self.s.optimizer().name != "sgd"  # plain SGD keeps no state between rounds
        gone = self.store.close_round(rid, "done", "ok", result, blob,
                                      optimizer_blob=safetensors_save(state_arrays(opt_state)) if stateful else None)
        self._audit_discarded(gone, "round closed")
        self.audit.append("round_close", {"round": rid, "survivors": surv_ids,
                                          "state_sha256": hashlib.sha256(blob).hexdigest(), **fin.audit})
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
