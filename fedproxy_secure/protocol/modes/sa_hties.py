"""Composite mode ``sa_hties``: one round = two secure-sum sessions of a base mode (DESIGN §1 stage ii).

The round is a state machine over named stages (``base`` = the mode's stages, e.g. ``advertise
share masked_input consistency unmask`` for masking, ``masked_input`` for plain)::

    join -> base (phase A, session id = the round's)          clients sum [Δ̂_i, sgn Δ_i]   (2P values)
         -> sa_reveal                  (h_norm = reveal only)  clients send the scalar h_i in the clear
         -> b_<base> (phase B, session id = sa_hties.session_id_b of the signed round config)
                                                               clients sum [u+, u-, w·1[u>0], w·1[u<0]] (4P)
         -> done | aborted

Closing phase A gives the server ``T = Σ Δ̂_i``, ``Σ sgn Δ_i`` and ``K`` (the phase-A survivors).
It signs (operator key, domain :data:`PHASE_DOMAIN`) the public outputs the clients need and sends
them as the server message of the next stage: ``sa_phase_a`` {T, K, m} for ``sa_reveal``, or the
phase-B config ``sa_phase_b`` {T, K, m, h_range, cohort, threshold, session ids} for the first
``b_`` stage. Phase B is a fresh, complete secure-aggregation session over the phase-A survivors
(those who also revealed h, in ``reveal`` mode): new session id, new keys, new masks.

Dropouts. A client summed in phase A but absent from phase B (dropped at ``sa_reveal`` or during
phase B) stays counted in ``T``, ``Σ sgn`` and ``K``: those sums are already revealed and cannot be
un-summed without revealing that client's vectors. Its ``u`` and ``w`` are absent from the phase-B
sums, so Δ* is the ρ-gated weighted mean over the phase-B survivors only (the rule is a ratio of
sums, so removing a client is exact), while ``C`` and every client's ``h_i``/``w_i`` still refer to
the K phase-A clients. :func:`~fedproxy_secure.protocol.sa_hties_wire.reference_step` computes exactly this in-process. Fewer than the
round threshold ``t`` at any stage aborts the round (nothing further is revealed).

Scale. Clients divide their clipped update by ``clip_norm`` before both phases (every phase value
then lies in [-1, 1], the encoder's clip range), and the server multiplies Δ* back by ``clip_norm``:
SA-H-TIES is positively homogeneous of degree 1, so this is exact.

``close`` is deterministic in its inputs (Ed25519 signatures are deterministic), so a restarted
server rebuilds both sessions by replaying the stored messages of the closed stages.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

from fedproxy_secure.aggregate.sa_hties import pack, sa_h_range, sa_phase_a_client, sa_phase_b_client, sa_server_finish, unpack
from fedproxy_secure.aggregate.sa_hties import sa_client_h
from fedproxy_secure.errors import ConfigError, DataError, ProtocolAbort, SecurityError
from fedproxy_secure.protocol.modes.base import ClientStages, Finish, Mode, RoundContext, ServerStages
from fedproxy_secure.protocol.sa_hties_wire import (
    B_PREFIX,
    MIN_COHORT,
    PHASE_A_PARTS,
    PHASE_B_PARTS,
    PHASE_CLIP,
    PHASE_DOMAIN,
    REVEAL_STAGE,
    SUM_SLACK,
    SAHTiesOptions,
    base_stage,
    check_h_message,
    check_phase_a_message,
    check_phase_b_message,
    check_sums,
    h_message,
    phase_a_message,
    phase_b_message,
    round_stages,
    sa_options,
)
from fedproxy_secure.wire.threshold import effective_threshold

#: base modes SA-H-TIES runs over, and the clip value each phase session gets (masking: the encoder's
#: coordinate range, every phase value lies in [-1, 1]; plain: no norm check, sums are range-checked)
PHASE_CLIPS: dict[str, float | None] = {"masking": PHASE_CLIP, "plain": None}


def _phase_config(cohort: list[int], session: bytes, threshold: int, dim: int, options: dict) -> dict:
    """The round-config view one phase session of the base mode is built from (identities of ``cohort`` only)."""
    opts = dict(options or {})
    if "identities" in opts:
        opts["identities"] = {k: v for k, v in opts["identities"].items() if int(k) in set(cohort)}
    return {"cohort": [[str(i), int(i)] for i in cohort], "session_id": bytes(session).hex(),
            "threshold": int(threshold), "dim": int(dim), "secagg_options": opts}


# ----------------------------------------------------------------------------- server stages

class SAHTiesServerStages:
    """Server side of one SA-H-TIES round: phase A session, optional reveal, phase B session.

    ``signer(body) -> signed body`` signs the two phase messages with the operator key (domain
    :data:`PHASE_DOMAIN`). ``options`` are the round's ``secagg_options`` (identities, max_clients).
    """

    def __init__(self, *, base: Mode, round_id: int, cohort: list[int], dim: int, threshold: int,
                 session_id: bytes, session_b: bytes, options: dict, sa: SAHTiesOptions,
                 signer: Callable[[dict], dict], context: bytes = b"") -> None:
        if session_b == session_id:
            raise ProtocolAbort("SA-H-TIES: phase B must not reuse the phase-A session id")
        self.mode, self.rid, self.dim, self.t = base, int(round_id), int(dim), int(threshold)
        self.session_a, self.session_b, self.sa, self.sign = bytes(session_id), bytes(session_b), sa, signer
        self.options = dict(options or {})
        self.context = bytes(context)  # the round config's digest; phase B binds the signed phase-B message too
        self.base = base.base_stages
        self.stages = round_stages(self.base, sa.h_norm)
        self.a = self._phase(cohort, self.session_a, PHASE_A_PARTS * self.dim, self.context)
        self.b = None
        self.T: np.ndarray | None = None
        self.sign_sum: np.ndarray | None = None
        self.survivors_a: list[int] = []
        self.alive_a: list[int] = []
        self.h_range: tuple[float, float] | None = None
        self.cohort_b: list[int] = []
        self.phase_a_msg: dict | None = None
        self.rejections: dict[int, str] = {}

    def _phase(self, cohort: list[int], session: bytes, dim: int, context: bytes) -> ServerStages:
        cfg = _phase_config(cohort, session, self.t, dim, self.options)
        return self.mode.server_stages(RoundContext(config=cfg, dim=dim, clip_norm=PHASE_CLIPS[self.mode.name],
                                                    context=context))

    def validate(self, stage: str, msg: dict, sid: int) -> None:
        """Refuse a malformed message for ``stage`` on arrival (before it is stored)."""
        if stage == REVEAL_STAGE:
            check_h_message(msg, sid)
            return
        phase = self.b if stage.startswith(B_PREFIX) else self.a
        if phase is None:
            raise ProtocolAbort(f"{stage}: the phase-B session is not set up yet")
        phase.validate(base_stage(stage), msg, sid)

    def close(self, stage: str, inputs: dict[int, dict]) -> dict[int, dict] | None:
        """Close ``stage`` with the survivors' messages; the next stage's message per client, None at the end.

        Any failure is a ``ProtocolAbort`` (the engine aborts the round with its reason).
        """
        try:
            return self._close(stage, inputs)
        except (ConfigError, DataError) as exc:
            raise ProtocolAbort(f"SA-H-TIES stage {stage}: {exc}") from None

    def _close(self, stage: str, inputs: dict[int, dict]) -> dict[int, dict] | None:
        if stage == REVEAL_STAGE:
            return self._after_reveal(inputs)
        if stage.startswith(B_PREFIX):
            if self.b is None:
                raise ProtocolAbort(f"{stage} closed before the phase-B session was set up")
            try:
                return self.b.close(base_stage(stage), inputs)
            finally:
                self.rejections.update(self.b.rejections)
        if self.T is not None:
            raise ProtocolAbort(f"phase-A stage {stage} closed again after phase A finished")
        try:
            out = self.a.close(stage, inputs)
        finally:
            self.rejections.update(self.a.rejections)
        return out if out is not None else self._after_a(inputs)

    def _after_a(self, last_inputs: dict[int, dict]) -> dict[int, dict]:
        total, surv = self.a.result()
        try:
            t, sgn = unpack(total, PHASE_A_PARTS)
        except DataError as exc:
            raise ProtocolAbort(f"phase A: {exc}") from None
        k = len(surv)
        if k < max(self.t, MIN_COHORT):
            raise ProtocolAbort(f"phase A summed {k} clients; SA-H-TIES needs at least max(t, {MIN_COHORT})")
        check_sums([t, sgn], float(k), "phase A")
        if np.linalg.norm(t) > k * (1 + SUM_SLACK):
            raise ProtocolAbort(f"phase A: ‖T‖ exceeds K = {k}: refusing the round")
        self.T, self.sign_sum, self.survivors_a = t, sgn, sorted(surv)
        self.alive_a = sorted(set(surv) & set(last_inputs))  # summed and still answering at the last stage
        if len(self.alive_a) < self.t:
            raise ProtocolAbort(f"only {len(self.alive_a)} phase-A survivors still answer, threshold {self.t}")
        if self.sa.h_norm == "reveal":
            self.phase_a_msg = self.sign(phase_a_message(self.rid, self.session_a, self.survivors_a, self.alive_a, t))
            return {sid: self.phase_a_msg for sid in self.alive_a}
        return self._start_b(self.alive_a, None)

    def _after_reveal(self, inputs: dict[int, dict]) -> dict[int, dict]:
        if self.T is None:
            raise ProtocolAbort("sa_reveal closed before phase A finished")
        hs: dict[int, float] = {}
        for sid in sorted(inputs):
            try:
                if sid not in self.alive_a:
                    raise ProtocolAbort("not a phase-A survivor")
                hs[sid] = check_h_message(inputs[sid], sid)
            except ProtocolAbort as exc:
                self.rejections[sid] = str(exc)
        if len(hs) < self.t:
            raise ProtocolAbort(f"only {len(hs)} clients revealed h, threshold {self.t}")
        return self._start_b(sorted(hs), sa_h_range(list(hs.values()), len(hs)))

    def _start_b(self, cohort_b: list[int], h_range) -> dict[int, dict]:
        from fedproxy_secure.wire.binding import phase_b_context

        self.cohort_b, self.h_range = list(cohort_b), h_range
        msg = self.sign(phase_b_message(self.rid, self.session_a, self.session_b, self.survivors_a, cohort_b,
                                        self.t, self.T, self.sa, h_range))
        self.b = self._phase(cohort_b, self.session_b, PHASE_B_PARTS * self.dim, phase_b_context(self.context, msg))
        return {sid: msg for sid in cohort_b}

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        """Phase-B sum (4P packed values) and the phase-B survivors."""
        if self.b is None:
            raise ProtocolAbort("SA-H-TIES: phase B did not run")
        return self.b.result()

    def global_step(self, clip_norm: float) -> tuple[np.ndarray, np.ndarray, dict, tuple[int, ...]]:
        """``(Δ*, C, info, phase-B survivors)``: Δ* scaled back by ``clip_norm``; ``ProtocolAbort`` on bad sums."""
        total, surv_b = self.result()
        try:
            sums_b = unpack(total, PHASE_B_PARTS)
        except DataError as exc:
            raise ProtocolAbort(f"phase B: {exc}") from None
        check_sums(sums_b, float(len(surv_b)), "phase B")
        k = len(self.survivors_a)
        res = sa_server_finish([self.T, self.sign_sum], sums_b, k, self.sa.params())
        delta = res.delta * float(clip_norm)
        if float(np.max(np.abs(delta), initial=0.0)) > clip_norm * (1 + 1e-3):
            raise ProtocolAbort("SA-H-TIES step has a coordinate above the clip norm: refusing the update")
        info = {"aggregator": "sa_hties", "K": k, "phase_a_survivors_sid": self.survivors_a,
                "phase_b_cohort_sid": self.cohort_b, "phase_b_survivors_sid": sorted(surv_b),
                "h_norm": self.sa.h_norm, "h_range": None if self.h_range is None else list(self.h_range),
                "sum_normalised_norm": res.info["sum_normalised_norm"], "mean_conflict": res.info["mean_conflict"],
                "gated_zero_fraction": res.info["gated_zero_fraction"],
                "phase_a_sum_sha256": hashlib.sha256(pack([self.T, self.sign_sum]).astype("<f8").tobytes()).hexdigest(),
                "phase_b_sum_sha256": hashlib.sha256(np.ascontiguousarray(total, "<f8").tobytes()).hexdigest()}
        return delta, res.conflict, info, tuple(sorted(surv_b))


# ----------------------------------------------------------------------------- client stages

def _session(x: object, what: str) -> bytes:
    if not isinstance(x, str) or len(x) != 64:
        raise ProtocolAbort(f"round config: {what} must be 32 bytes of hex")
    try:
        return bytes.fromhex(x)
    except ValueError:
        raise ProtocolAbort(f"round config: {what} is not hex") from None


class SAHTiesClientStages:
    """One client's SA-H-TIES round over the mode's client stages (masking or plain)."""

    def __init__(self, cfg: dict, vector: np.ndarray, sid: int, *, base: Mode, operator, identity_key=None,
                 used_sessions: set | None = None, context: bytes | None = None,
                 graph_nonce: bytes | None = None) -> None:
        """``cfg``: the verified round config; ``vector``: our clipped update; ``operator``: the pinned
        operator public key that must sign the phase messages; ``context``: the round config's
        digest (default: computed from ``cfg``); ``graph_nonce``: this site's committed nonce."""
        from fedproxy_secure.wire.binding import round_config_digest

        if operator is None:
            raise ProtocolAbort("SA-H-TIES needs the operator's public key to check the phase messages")
        sa = cfg.get("sa_hties")
        if not isinstance(sa, dict):
            raise ProtocolAbort("round config: aggregator sa_hties without an sa_hties section")
        try:
            self.opts = sa_options({k: v for k, v in sa.items() if k != "session_id_b"})
        except ConfigError as exc:
            raise ProtocolAbort(f"round config: {exc}") from None
        self.mode = base
        self.base = base.base_stages
        self.session_a = _session(cfg["session_id"], "session_id")
        self.session_b = _session(sa.get("session_id_b"), "sa_hties.session_id_b")
        if self.session_b == self.session_a:
            raise ProtocolAbort("round config: phase B reuses the phase-A session id: refusing")
        if used_sessions is not None and self.session_b in used_sessions:
            raise ProtocolAbort("round config: phase-B session id already used: refusing (replay)")
        self.cfg, self.sid, self.operator, self.key = cfg, int(sid), operator, identity_key
        self.context = round_config_digest(cfg) if context is None else bytes(context)
        self.graph_nonce = graph_nonce
        self.dim, self.t = int(cfg["dim"]), int(cfg["threshold"])
        self.cohort_size = len(cfg["cohort"])
        self.clip = float(cfg["clip_norm"])
        u = np.asarray(vector, dtype=np.float64)
        if u.shape != (self.dim,) or not np.all(np.isfinite(u)):
            raise ProtocolAbort(f"SA-H-TIES: update must be {self.dim} finite values")
        self.x = np.clip(u / self.clip, -1.0, 1.0)  # the caller clipped ‖u‖ <= clip_norm
        self.x_hat = sa_phase_a_client(self.x)[0]  # our phase-A unit vector: T must be it plus K - 1 units
        self.stages = round_stages(self.base, self.opts.h_norm)
        self.a = self._phase(pack(sa_phase_a_client(self.x)), self.session_a, [i for _, i in cfg["cohort"]],
                             used_sessions, self.context)
        if used_sessions is not None:
            used_sessions.add(self.session_b)  # reserved now, persisted by the caller before any key leaves
        self.b = None
        self.T = None
        self.K: int | None = None
        self.h: float | None = None
        self.phase_a: dict | None = None
        self.phase_b: dict | None = None

    def _phase(self, vector: np.ndarray, session: bytes, cohort: list[int], used_sessions,
               context: bytes) -> ClientStages:
        pcfg = _phase_config(cohort, session, self.t, vector.size, self.cfg.get("secagg_options", {}))
        pcfg["clip_norm"] = PHASE_CLIP
        return self.mode.client_stages(pcfg, vector, self.sid, identity_key=self.key, used_sessions=used_sessions,
                                       context=context, graph_nonce=self.graph_nonce)

    def _verified(self, msg: object, kind: str) -> dict:
        from fedproxy_secure.protocol.roundcfg import verify_round_config

        try:
            return verify_round_config(self.operator, msg, PHASE_DOMAIN)
        except ProtocolAbort:
            raise
        except (SecurityError, KeyError, TypeError) as exc:
            raise ProtocolAbort(f"{kind} message is not signed by the operator: {exc}") from None

    def step(self, stage: str, server_msg: dict) -> dict:
        """Validate the server's message for ``stage`` and return our reply (or ``ProtocolAbort``)."""
        if stage == REVEAL_STAGE:
            if self.opts.h_norm != "reveal" or self.T is not None:
                raise ProtocolAbort("unexpected sa_reveal stage")
            body = self._verified(server_msg, "sa_phase_a")
            self.T, self.K = check_phase_a_message(body, round_id=self.cfg["round_id"], session_a=self.session_a,
                                                   sid=self.sid, dim=self.dim, cohort_size=self.cohort_size,
                                                   threshold=self.t, own=self.x_hat)
            self.phase_a = body
            self.h = sa_client_h(self.x, self.T, self.K)
            return h_message(self.sid, self.h)
        if not stage.startswith(B_PREFIX):
            return self.a.step(stage, server_msg)
        base = base_stage(stage)
        if base == self.base[0]:
            if self.b is not None:
                raise ProtocolAbort("phase B started twice")
            if self.opts.h_norm == "reveal" and self.h is None:
                raise ProtocolAbort("phase B before we revealed h")
            return self._start_b(base, server_msg)
        if self.b is None:
            raise ProtocolAbort(f"{stage} before the phase-B config")
        return self.b.step(base, server_msg)

    def _start_b(self, base: str, server_msg: dict) -> dict:
        body = self._verified(server_msg, "sa_phase_b")
        t, k, cohort_b, h_range = check_phase_b_message(
            body, round_id=self.cfg["round_id"], session_a=self.session_a, session_b=self.session_b, sid=self.sid,
            dim=self.dim, cohort_size=self.cohort_size, threshold=self.t, opts=self.opts, own_h=self.h,
            phase_a=self.phase_a, own=self.x_hat)
        self.T, self.K, self.phase_b = t, k, body
        msg = sa_phase_b_client(self.x, t, None, self.opts.params(), num_clients=k, h_range=h_range)
        v = pack(msg.vectors)
        if v.size != PHASE_B_PARTS * self.dim or float(np.max(np.abs(v), initial=0.0)) > PHASE_CLIP:
            raise ProtocolAbort("phase-B vectors outside [-1, 1]")  # cannot happen for ‖x‖_inf <= 1
        from fedproxy_secure.wire.binding import phase_b_context

        # session_b already reserved in used_sessions; its key agreement binds this signed phase-B message
        self.b = self._phase(v, self.session_b, cohort_b, None, phase_b_context(self.context, body))
        return self.b.step(base, {})




# ----------------------------------------------------------------------------- the mode

class SAHTiesMode(Mode):
    """SA-H-TIES as a composite of two secure sums of the ``base`` mode (masking, or plain for baselines)."""

    name = "sa_hties"
    settings_section = "sa_hties"

    def __init__(self, base: Mode) -> None:
        self.base = base
        self.base_stages = base.base_stages
        self.deadlines = base.deadlines

    def validate_settings(self, s) -> None:
        """Base mode supported, cohort >= 3, ``federation.sa_hties`` valid (``ConfigError`` naming the field)."""
        if self.base.name not in PHASE_CLIPS:
            raise ConfigError(f"federation.aggregator sa_hties with federation.mode={s.mode!r} is not wired "
                              "to the network yet; use mode masking")
        if s.min_clients < MIN_COHORT:
            raise ConfigError(f"federation.min_clients={s.min_clients}: SA-H-TIES needs >= {MIN_COHORT} (with 2 "
                              "clients the broadcast phase-A sum reveals the other client's update direction)")
        if s.weighting != "uniform":
            raise ConfigError(f"federation.weighting={s.weighting!r}: SA-H-TIES sets its own weights; use uniform")
        self.base.validate_settings(s)
        sa_options(s.sa_hties)

    def stages(self, s) -> tuple[str, ...]:
        """Phase A (the base stages), ``sa_reveal`` when h is revealed, phase B (``b_`` + base stages)."""
        return round_stages(self.base.base_stages, sa_options(s.sa_hties).h_norm)

    def deadline(self, s, stage: str) -> float:
        """A phase-B stage has its base stage's deadline."""
        d = s.deadlines
        return float(d.get(stage, d.get(base_stage(stage), self.base.deadline(s, base_stage(stage)))))

    def threshold(self, s, n: int) -> int:
        """The base mode's rule, raised to at least 3 (the phase-A sum is broadcast)."""
        return effective_threshold(self.base.name, n, s.threshold, self.name)

    def check_server(self, he_key) -> None:
        """Whatever the base mode needs."""
        self.base.check_server(he_key)

    def round_options(self, s, round_id: int, n: int, session_id: bytes, he_key) -> dict:
        """The base mode's options plus ``sa_hties``: the options and a fresh phase-B session id."""
        import secrets

        out = dict(self.base.round_options(s, round_id, n, session_id, he_key))
        session_b = secrets.token_bytes(32)  # phase B: a fresh session (never the phase-A id, never reused)
        while session_b == session_id:
            session_b = secrets.token_bytes(32)
        out["sa_hties"] = {**sa_options(s.sa_hties).model_dump(), "session_id_b": session_b.hex()}
        return out

    def server_stages(self, ctx: RoundContext) -> ServerStages:
        """Both phases of the round; phase messages are signed with the operator key (``PHASE_DOMAIN``)."""
        cfg = ctx.config
        sa = cfg["sa_hties"]

        def sign(body: dict) -> dict:
            return ctx.phase_signer(body, PHASE_DOMAIN) if ctx.phase_signer is not None else body

        return SAHTiesServerStages(base=self.base, round_id=int(cfg["round_id"]), cohort=ctx.cohort, dim=ctx.dim,
                                   threshold=int(cfg["threshold"]), session_id=ctx.session_id,
                                   session_b=bytes.fromhex(sa["session_id_b"]), options=cfg.get("secagg_options", {}),
                                   sa=sa_options({k: v for k, v in sa.items() if k != "session_id_b"}), signer=sign,
                                   context=ctx.context_digest)

    def client_stages(self, cfg: dict, vector: np.ndarray, sid: int, *, identity_key=None,
                      used_sessions: set | None = None, operator=None, context: bytes | None = None,
                      graph_nonce: bytes | None = None) -> ClientStages:
        """The client's two phases; ``operator`` (pinned key) must sign the phase messages."""
        return SAHTiesClientStages(cfg, vector, sid, base=self.base, operator=operator, identity_key=identity_key,
                                   used_sessions=used_sessions, context=context, graph_nonce=graph_nonce)

    def finish(self, proto: ServerStages, theta: np.ndarray, s, names: dict[int, str]) -> Finish:
        """Δ* and C from the two phases' sums (``aggregate.sa_hties.sa_server_finish``); θ += Δ*, C kept."""
        try:
            delta, conflict, info, surv_b = proto.global_step(s.clip_norm)
        except (ProtocolAbort, DataError, ValueError) as exc:
            raise ProtocolAbort(f"SA-H-TIES finish failed: {exc}") from None
        info["phase_a_survivors"] = [names[i] for i in info["phase_a_survivors_sid"]]
        from fedproxy_secure.wire.codec import vec_to_b64
        from fedproxy_secure.protocol.modes.base import vec_sha256

        result = {"sa_hties": info, "delta_sha256": vec_sha256(delta), "delta_b64": vec_to_b64(delta),
                  "delta_norm": float(np.linalg.norm(delta))}
        return Finish(delta=delta, survivors=tuple(surv_b), conflict=conflict, result=result,
                      audit={"aggregator": "sa_hties", "phase_a_survivors": info["phase_a_survivors"],
                             "delta_norm": result["delta_norm"]})
