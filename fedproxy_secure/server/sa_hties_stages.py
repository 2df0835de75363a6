"""SA-H-TIES over the network: one round = two secure-sum sessions (DESIGN §1 stage ii).

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
the K phase-A clients. :func:`reference_step` computes exactly this in-process. Fewer than the
round threshold ``t`` at any stage aborts the round (nothing further is revealed).

Scale. Clients divide their clipped update by ``clip_norm`` before both phases (every phase value
then lies in [-1, 1], the encoder's clip range), and the server multiplies Δ* back by ``clip_norm``:
SA-H-TIES is positively homogeneous of degree 1, so this is exact.

``close`` is deterministic in its inputs (Ed25519 signatures are deterministic), so a restarted
server rebuilds both sessions by replaying the stored messages of the closed stages.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedproxy_secure.aggregate.base import AggResult
from fedproxy_secure.aggregate.hties import HTiesParams
from fedproxy_secure.aggregate.sa_hties import (
    PHASE_A_PARTS,
    PHASE_B_PARTS,
    pack,
    sa_client_h,
    sa_h_range,
    sa_phase_a_client,
    sa_phase_b_client,
    sa_server_finish,
    sa_weight_shift,
    unpack,
)
from fedproxy_secure.errors import ConfigError, DataError, ProtocolAbort
from fedproxy_secure.server.protocols import PlainStages, make_server_stages, vec_from_b64, vec_to_b64

REVEAL_STAGE = "sa_reveal"
B_PREFIX = "b_"
#: signature domain of the two phase messages (kept apart from round configs)
PHASE_DOMAIN = b"fedproxy-secure/v1/sa-hties-phase\n"
NET_MODES = ("masking", "plain", "none")
MIN_COHORT = 3  # with K = 2, T - Δ̂_i is the other client's normalised update (SECURITY.md)
#: every phase value lies in [-1, 1] once the update is divided by clip_norm
PHASE_CLIP = 1.0
SUM_SLACK = 1e-6


class SAHTiesOptions(BaseModel):
    """``federation.sa_hties``: the H-TIES hyper-parameters every client uses (signed in the round config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    h_norm: Literal["reveal", "none"] = Field("reveal", description="reveal h_i in the clear for exact min-max "
                                              "normalisation, or none (nothing revealed, larger departure)")
    r0: float = Field(1.0, ge=0, le=1)
    delta: float = Field(0.2, ge=0)
    rho: float = Field(1.1, ge=1)

    def params(self) -> HTiesParams:
        """The :class:`HTiesParams` of these options."""
        return HTiesParams(r0=self.r0, delta=self.delta, rho=self.rho, h_norm=self.h_norm)


def sa_options(opts: dict | None) -> SAHTiesOptions:
    """Validated ``federation.sa_hties`` options; ``ConfigError`` naming the field and the fix."""
    if opts is not None and not isinstance(opts, dict):
        raise ConfigError(f"federation.sa_hties = {opts!r}: must be a mapping (h_norm, r0, delta, rho)")
    try:
        return SAHTiesOptions.model_validate(opts or {})
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(x) for x in e["loc"])
        raise ConfigError(f"federation.sa_hties.{where} = {e.get('input')!r}: {e['msg']} "
                          f"(allowed keys: {sorted(SAHTiesOptions.model_fields)})") from None


def round_stages(base: tuple[str, ...], h_norm: str) -> tuple[str, ...]:
    """All stages after ``join`` of an SA-H-TIES round over a mode whose stages are ``base``."""
    return tuple(base) + ((REVEAL_STAGE,) if h_norm == "reveal" else ()) + tuple(B_PREFIX + s for s in base)


def base_stage(stage: str) -> str:
    """The mode's stage name behind a phase-B stage name (``b_share`` -> ``share``); others unchanged."""
    return stage[len(B_PREFIX):] if stage.startswith(B_PREFIX) else stage


def _mode_stages(mode: str) -> tuple[str, ...]:
    if mode in ("plain", "none"):
        return PlainStages.stages
    if mode == "masking":
        from fedproxy_secure.server.masking_stages import MaskingServerStages

        return MaskingServerStages.stages
    raise ConfigError(f"federation.aggregator sa_hties over mode {mode!r} is not wired to the network; "
                      f"use mode masking (or plain for baselines)")


# ----------------------------------------------------------------------------- pure message logic

def h_message(sid: int, h: float) -> dict:
    """A client's ``sa_reveal`` message (the scalar h_i, in the clear)."""
    return {"type": "sa_h", "sid": int(sid), "h": float(h)}


def check_h_message(msg: object, sid: int) -> float:
    """The h_i of a ``sa_h`` message from secagg id ``sid``; ``ProtocolAbort`` unless well formed, h in [0, 1]."""
    if not isinstance(msg, dict) or msg.get("type") != "sa_h" or set(msg) != {"type", "sid", "h"}:
        raise ProtocolAbort("sa_reveal expects {type: sa_h, sid, h}")
    if isinstance(msg["sid"], bool) or msg["sid"] != sid:
        raise ProtocolAbort(f"sa_h claims secagg id {msg['sid']!r}, the sender is {sid}")
    h = msg["h"]
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or not 0 <= h <= 1:
        raise ProtocolAbort(f"sa_h: h = {h!r} must be a number in [0, 1]")
    return float(h)


def _ids(x: object, what: str) -> list[int]:
    if not isinstance(x, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in x):
        raise ProtocolAbort(f"{what}: expected a list of positive secagg ids")
    if x != sorted(set(x)):
        raise ProtocolAbort(f"{what}: ids must be distinct and sorted")
    return list(x)


def check_sums(sums: list[np.ndarray], bound: float, what: str) -> None:
    """``ProtocolAbort`` unless every summed value is finite and within ``[-bound, bound]``."""
    for s in sums:
        if not np.all(np.isfinite(s)) or (s.size and float(np.max(np.abs(s))) > bound * (1 + SUM_SLACK) + SUM_SLACK):
            raise ProtocolAbort(f"{what}: a summed value lies outside [-{bound}, {bound}] (a client sent values "
                                "outside the phase's range): refusing the round")


def check_public_t(t_b64: object, dim: int, k: int) -> np.ndarray:
    """Decode the broadcast ``T``: ``dim`` finite values with ``|T_p| ≤ K`` and ``‖T‖ ≤ K``."""
    t = vec_from_b64(t_b64, dim)
    if float(np.max(np.abs(t), initial=0.0)) > k * (1 + SUM_SLACK) or np.linalg.norm(t) > k * (1 + SUM_SLACK):
        raise ProtocolAbort(f"phase-A sum T exceeds its bound K = {k}")
    return t


def phase_a_message(round_id: int, session_a: bytes, survivors: list[int], alive: list[int],
                    t: np.ndarray) -> dict:
    """The public outputs of phase A sent (signed) to the phase-A survivors before ``sa_reveal``."""
    return {"type": "sa_phase_a", "round_id": int(round_id), "session_id": session_a.hex(),
            "K": len(survivors), "survivors": list(survivors), "recipients": list(alive),
            "T": vec_to_b64(t), "m": sa_weight_shift(t)}


def phase_b_message(round_id: int, session_a: bytes, session_b: bytes, survivors: list[int], cohort_b: list[int],
                    threshold: int, t: np.ndarray, opts: SAHTiesOptions,
                    h_range: tuple[float, float] | None) -> dict:
    """The phase-B config (signed): what a client needs to compute and secure-sum its phase-B vectors."""
    return {"type": "sa_phase_b", "round_id": int(round_id), "session_id_a": session_a.hex(),
            "session_id": session_b.hex(), "K": len(survivors), "survivors": list(survivors),
            "cohort": list(cohort_b), "threshold": int(threshold), "T": vec_to_b64(t), "m": sa_weight_shift(t),
            "h_range": None if h_range is None else [float(h_range[0]), float(h_range[1])],
            "options": opts.model_dump()}


def _check_common(msg: dict, *, kind: str, round_id: int, sid: int, dim: int, cohort_size: int,
                  threshold: int) -> tuple[np.ndarray, int, list[int]]:
    if not isinstance(msg, dict) or msg.get("type") != kind:
        raise ProtocolAbort(f"expected a signed {kind} message, got {msg.get('type') if isinstance(msg, dict) else msg!r}")
    if msg.get("round_id") != round_id:
        raise ProtocolAbort(f"{kind} is for round {msg.get('round_id')!r}, not {round_id}")
    k = msg.get("K")
    if not isinstance(k, int) or isinstance(k, bool) or not max(threshold, MIN_COHORT) <= k <= cohort_size:
        raise ProtocolAbort(f"{kind}: K = {k!r} must be in [max(t, {MIN_COHORT}), cohort size {cohort_size}]")
    surv = _ids(msg.get("survivors"), f"{kind} survivors")
    if len(surv) != k:
        raise ProtocolAbort(f"{kind}: {len(surv)} survivors listed but K = {k}")
    t = check_public_t(msg.get("T"), dim, k)
    m = msg.get("m")
    if not isinstance(m, (int, float)) or isinstance(m, bool) or abs(float(m) - sa_weight_shift(t)) > 1e-9:
        raise ProtocolAbort(f"{kind}: shift m = {m!r} does not match max(‖T‖ - 1, 0) = {sa_weight_shift(t)!r}")
    return t, k, surv


def check_phase_a_message(msg: dict, *, round_id: int, session_a: bytes, sid: int, dim: int, cohort_size: int,
                          threshold: int) -> tuple[np.ndarray, int]:
    """Client: ``(T, K)`` from a *signature-verified* ``sa_phase_a`` message, or ``ProtocolAbort``.

    Checks round, session, K within [max(t, 3), cohort size], the survivor list (distinct, K of
    them, us among them), T (``dim`` finite values, ``‖T‖ ≤ K``) and that m is the shift of T.
    """
    t, k, surv = _check_common(msg, kind="sa_phase_a", round_id=round_id, sid=sid, dim=dim,
                               cohort_size=cohort_size, threshold=threshold)
    if msg.get("session_id") != session_a.hex():
        raise ProtocolAbort("sa_phase_a carries another session id than the round's")
    rec = _ids(msg.get("recipients"), "sa_phase_a recipients")
    if sid not in surv or sid not in rec or not set(rec) <= set(surv):
        raise ProtocolAbort(f"sa_phase_a: secagg id {sid} is not a phase-A survivor")
    return t, k


def check_phase_b_message(msg: dict, *, round_id: int, session_a: bytes, session_b: bytes, sid: int, dim: int,
                          cohort_size: int, threshold: int, opts: SAHTiesOptions, own_h: float | None = None,
                          phase_a: dict | None = None) -> tuple[np.ndarray, int, list[int], tuple[float, float] | None]:
    """Client: ``(T, K, phase-B cohort, h_range)`` from a *signature-verified* ``sa_phase_b`` config.

    Checks everything :func:`check_phase_a_message` checks, plus: both session ids (phase B's is
    the one the signed round config announced), the options equal the round config's, the cohort
    (us in it, a subset of the survivors, at least ``t`` members, ``t`` unchanged), ``h_range``
    (reveal: ``0 ≤ lo ≤ own h ≤ hi ≤ 1``; none: absent) and, after ``sa_reveal``, the same T, K and
    survivors as the phase-A message.
    """
    t, k, surv = _check_common(msg, kind="sa_phase_b", round_id=round_id, sid=sid, dim=dim,
                               cohort_size=cohort_size, threshold=threshold)
    if msg.get("session_id_a") != session_a.hex() or msg.get("session_id") != session_b.hex():
        raise ProtocolAbort("sa_phase_b: session ids differ from the signed round config's")
    if msg.get("options") != opts.model_dump():
        raise ProtocolAbort("sa_phase_b: SA-H-TIES options differ from the signed round config's")
    if msg.get("threshold") != threshold:
        raise ProtocolAbort(f"sa_phase_b: threshold {msg.get('threshold')!r} differs from the round's {threshold}")
    cohort = _ids(msg.get("cohort"), "sa_phase_b cohort")
    if sid not in cohort or not set(cohort) <= set(surv) or len(cohort) < threshold:
        raise ProtocolAbort(f"sa_phase_b: cohort {cohort} must contain us ({sid}), be among the phase-A survivors "
                            f"and have at least t = {threshold} members")
    if phase_a is not None and (phase_a.get("T") != msg["T"] or phase_a.get("K") != k
                                or phase_a.get("survivors") != surv):
        raise ProtocolAbort("sa_phase_b: T, K or the survivors differ from the phase-A message")
    hr = msg.get("h_range")
    h_range = None
    if opts.h_norm == "reveal":
        ok = (isinstance(hr, list) and len(hr) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                             and math.isfinite(x) for x in hr))
        if not ok or not 0 <= hr[0] <= hr[1] <= 1:
            raise ProtocolAbort(f"sa_phase_b: h_range = {hr!r} is not a (min, max) pair in [0, 1]")
        if own_h is not None and not hr[0] - 1e-12 <= own_h <= hr[1] + 1e-12:
            raise ProtocolAbort(f"sa_phase_b: h_range {hr} does not contain our own revealed h = {own_h}")
        h_range = (float(hr[0]), float(hr[1]))
    elif hr is not None:
        raise ProtocolAbort("sa_phase_b: h_range given although h_norm is none")
    return t, k, cohort, h_range


def validate_message(mode: str, stage: str, msg: dict, sid: int, session_a: bytes, session_b: bytes,
                     dim: int) -> None:
    """Server, on arrival: refuse a malformed message for ``stage`` (before it is stored)."""
    if stage == REVEAL_STAGE:
        check_h_message(msg, sid)
        return
    phase_b = stage.startswith(B_PREFIX)
    base = base_stage(stage)
    if mode in ("plain", "none"):
        PlainStages.validate(base, msg, (PHASE_B_PARTS if phase_b else PHASE_A_PARTS) * dim)
        return
    from fedproxy_secure.server.masking_stages import MaskingServerStages

    MaskingServerStages.validate(base, msg, sid, session_b if phase_b else session_a)


# ----------------------------------------------------------------------------- reference (tests, docs)

def reference_step(updates: dict[int, np.ndarray], phase_b: list[int], opts: SAHTiesOptions | None = None,
                   revealed: list[int] | None = None, clip_norm: float = 1.0) -> AggResult:
    """What a networked SA-H-TIES round computes, in-process over exact sums.

    ``updates``: the phase-A survivors' clipped updates by secagg id (K = their number);
    ``phase_b``: the ids whose phase-B input was summed; ``revealed``: the ids whose h defines
    ``h_range`` (default: all of ``updates``). With ``phase_b = revealed = all`` this equals
    ``make_aggregator("sa_hties").aggregate`` (scaled by ``clip_norm``).
    """
    o = opts or SAHTiesOptions()
    prm = o.params()
    ids = sorted(updates)
    k = len(ids)
    x = {i: np.asarray(updates[i], dtype=np.float64) / clip_norm for i in ids}
    a = [sa_phase_a_client(x[i]) for i in ids]
    sums_a = [sum(v[j] for v in a) for j in range(PHASE_A_PARTS)]
    h_range = None
    if o.h_norm == "reveal":
        rev = ids if revealed is None else sorted(revealed)
        h_range = sa_h_range([sa_client_h(x[i], sums_a[0], k) for i in rev], len(rev))
    b = [sa_phase_b_client(x[i], sums_a[0], sums_a[1], prm, num_clients=k, h_range=h_range).vectors
         for i in sorted(phase_b)]
    sums_b = [sum(v[j] for v in b) for j in range(PHASE_B_PARTS)]
    res = sa_server_finish(sums_a, sums_b, k, prm)
    res.delta = res.delta * clip_norm
    return res


# ----------------------------------------------------------------------------- server stages

class SAHTiesServerStages:
    """Server side of one SA-H-TIES round: phase A session, optional reveal, phase B session.

    ``signer(body) -> signed body`` signs the two phase messages with the operator key (domain
    :data:`PHASE_DOMAIN`). ``options`` are the round's ``secagg_options`` (identities, max_clients).
    """

    def __init__(self, *, mode: str, round_id: int, cohort: list[int], dim: int, threshold: int,
                 session_id: bytes, session_b: bytes, options: dict, sa: SAHTiesOptions,
                 signer: Callable[[dict], dict]) -> None:
        if session_b == session_id:
            raise ProtocolAbort("SA-H-TIES: phase B must not reuse the phase-A session id")
        self.mode, self.rid, self.dim, self.t = mode, int(round_id), int(dim), int(threshold)
        self.session_a, self.session_b, self.sa, self.sign = bytes(session_id), bytes(session_b), sa, signer
        self.options = dict(options or {})
        self.base = _mode_stages(mode)
        self.stages = round_stages(self.base, sa.h_norm)
        self.a = self._phase(cohort, self.session_a, PHASE_A_PARTS * self.dim)
        self.b = None
        self.T: np.ndarray | None = None
        self.sign_sum: np.ndarray | None = None
        self.survivors_a: list[int] = []
        self.alive_a: list[int] = []
        self.h_range: tuple[float, float] | None = None
        self.cohort_b: list[int] = []
        self.phase_a_msg: dict | None = None
        self.rejections: dict[int, str] = {}

    def _phase(self, cohort: list[int], session: bytes, dim: int):
        opts = dict(self.options)
        if "identities" in opts:
            opts["identities"] = {k: v for k, v in opts["identities"].items() if int(k) in set(cohort)}
        return make_server_stages(self.mode, cohort=list(cohort), dim=dim, threshold=self.t, session_id=session,
                                  clip_norm=PHASE_CLIP if self.mode == "masking" else None, options=opts)

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
            return self.b.close(base_stage(stage), inputs)
        if self.T is not None:
            raise ProtocolAbort(f"phase-A stage {stage} closed again after phase A finished")
        out = self.a.close(stage, inputs)
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
        self.cohort_b, self.h_range = list(cohort_b), h_range
        self.b = self._phase(cohort_b, self.session_b, PHASE_B_PARTS * self.dim)
        msg = self.sign(phase_b_message(self.rid, self.session_a, self.session_b, self.survivors_a, cohort_b,
                                        self.t, self.T, self.sa, h_range))
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
