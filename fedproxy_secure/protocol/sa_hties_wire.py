"""SA-H-TIES over the network: options, phase messages and their checks (both parties use these).

The round shape, the dropout semantics and the scale argument are described in
:mod:`fedproxy_secure.protocol.modes.sa_hties`, which holds the stage machines. The math is
:mod:`fedproxy_secure.aggregate.sa_hties` (the in-process aggregator's own functions).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, ValidationError

from fedproxy_secure.aggregate.base import AggResult
from fedproxy_secure.aggregate.hties import HTiesParams
from fedproxy_secure.aggregate.sa_hties import (
    PHASE_A_PARTS,
    PHASE_B_PARTS,
    sa_client_h,
    sa_h_range,
    sa_phase_a_client,
    sa_phase_b_client,
    sa_server_finish,
    sa_weight_shift,
)
from fedproxy_secure.errors import ConfigError, ProtocolAbort
from fedproxy_secure.strict import StrictModel
from fedproxy_secure.wire.codec import vec_from_b64, vec_to_b64
from fedproxy_secure.protocol.names import SA_B_PREFIX as B_PREFIX
from fedproxy_secure.protocol.names import SA_PHASE_DOMAIN as PHASE_DOMAIN
from fedproxy_secure.protocol.names import SA_REVEAL_STAGE as REVEAL_STAGE
from fedproxy_secure.wire.threshold import SA_HTIES_MIN as MIN_COHORT

__all__ = ["B_PREFIX", "PHASE_DOMAIN", "REVEAL_STAGE", "MIN_COHORT", "PHASE_A_PARTS", "PHASE_B_PARTS", "PHASE_CLIP",
           "SAHTiesOptions", "sa_options", "round_stages", "base_stage", "h_message", "check_h_message",
           "check_sums", "check_public_t", "check_t_values", "phase_a_message", "phase_b_message", "check_phase_a_message",
           "check_phase_b_message", "reference_step"]

#: every phase value lies in [-1, 1] once the update is divided by clip_norm
PHASE_CLIP = 1.0
SUM_SLACK = 1e-6


class SAHTiesOptions(StrictModel):
    """``federation.sa_hties``: the H-TIES hyper-parameters every client uses (signed in the round config)."""

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


def check_public_t(t_b64: object, dim: int, k: int, own: np.ndarray | None = None) -> np.ndarray:
    """Decode the broadcast ``T``: ``dim`` finite values with ``|T_p| ≤ K`` and ``‖T‖ ≤ K``; with ``own``
    (this site's own phase-A unit vector x̂, or 0 for a zero update) also ``‖T − x̂‖ ≤ K − 1``.

    Why the tighter bound: ``‖T‖ ≤ K`` admits ``T = K·e`` for any unit ``e``. Sent to a site whose
    update is orthogonal to ``e`` it reads as K − 1 peers that all point along ``e``: ``s_i = -1`` and
    the shift ``m = K − 1``, so the site's weight ``w_i = exp(s_i − m)`` falls to ``e^{−K}`` while a
    target's stays near 1 (the phase-B sum is then nearly the target's trimmed update). But T is x̂
    plus K − 1 unit vectors, so ``‖T − x̂‖ ≤ K − 1`` for every honest T, and ``T = K·e`` fails it unless
    ``e = x̂``. Slack: the fixed-point error of K encoded unit vectors (2^-30 per coordinate and site).
    """
    t = vec_from_b64(t_b64, dim)
    check_t_values(t, k, own)
    return t


def check_t_values(t: np.ndarray, k: int, own: np.ndarray | None = None, coord_error: float = 2.0 ** -30) -> None:
    """The bounds of :func:`check_public_t` on a decoded T (``ProtocolAbort``); ``coord_error``: the
    encoding error per coordinate and site (2^-30 for our masking; Flower's SecAgg+ quantises coarser)."""
    t = np.asarray(t, dtype=np.float64).ravel()
    if not np.all(np.isfinite(t)):
        raise ProtocolAbort("phase-A sum T has non-finite values")
    if float(np.max(np.abs(t), initial=0.0)) > k * (1 + SUM_SLACK) or np.linalg.norm(t) > k * (1 + SUM_SLACK):
        raise ProtocolAbort(f"phase-A sum T exceeds its bound K = {k}")
    if own is not None:
        slack = (k - 1) * SUM_SLACK + k * math.sqrt(t.size) * coord_error
        if float(np.linalg.norm(t - np.asarray(own, dtype=np.float64).ravel())) > (k - 1) + slack:
            raise ProtocolAbort(f"phase-A sum T is not this site's vector plus K - 1 = {k - 1} unit vectors "
                                "(‖T − x̂‖ > K - 1): refusing the round")


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
                  threshold: int, own: np.ndarray | None = None) -> tuple[np.ndarray, int, list[int]]:
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
    t = check_public_t(msg.get("T"), dim, k, own)
    m = msg.get("m")
    if not isinstance(m, (int, float)) or isinstance(m, bool) or abs(float(m) - sa_weight_shift(t)) > 1e-9:
        raise ProtocolAbort(f"{kind}: shift m = {m!r} does not match max(‖T‖ - 1, 0) = {sa_weight_shift(t)!r}")
    return t, k, surv


def check_phase_a_message(msg: dict, *, round_id: int, session_a: bytes, sid: int, dim: int, cohort_size: int,
                          threshold: int, own: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Client: ``(T, K)`` from a *signature-verified* ``sa_phase_a`` message, or ``ProtocolAbort``.

    Checks round, session, K within [max(t, 3), cohort size], the survivor list (distinct, K of
    them, us among them), T (``dim`` finite values, ``‖T‖ ≤ K``, and ``‖T − own‖ ≤ K − 1`` with
    ``own`` = our phase-A unit vector) and that m is the shift of T.
    """
    t, k, surv = _check_common(msg, kind="sa_phase_a", round_id=round_id, sid=sid, dim=dim,
                               cohort_size=cohort_size, threshold=threshold, own=own)
    if msg.get("session_id") != session_a.hex():
        raise ProtocolAbort("sa_phase_a carries another session id than the round's")
    rec = _ids(msg.get("recipients"), "sa_phase_a recipients")
    if sid not in surv or sid not in rec or not set(rec) <= set(surv):
        raise ProtocolAbort(f"sa_phase_a: secagg id {sid} is not a phase-A survivor")
    return t, k


def check_phase_b_message(msg: dict, *, round_id: int, session_a: bytes, session_b: bytes, sid: int, dim: int,
                          cohort_size: int, threshold: int, opts: SAHTiesOptions, own_h: float | None = None,
                          phase_a: dict | None = None, own: np.ndarray | None = None,
                          ) -> tuple[np.ndarray, int, list[int], tuple[float, float] | None]:
    """Client: ``(T, K, phase-B cohort, h_range)`` from a *signature-verified* ``sa_phase_b`` config.

    Checks everything :func:`check_phase_a_message` checks, plus: both session ids (phase B's is
    the one the signed round config announced), the options equal the round config's, the cohort
    (us in it, a subset of the survivors, at least ``t`` members, ``t`` unchanged), ``h_range``
    (reveal: ``0 ≤ lo ≤ own h ≤ hi ≤ 1``; none: absent) and, after ``sa_reveal``, the same T, K and
    survivors as the phase-A message.
    """
    t, k, surv = _check_common(msg, kind="sa_phase_b", round_id=round_id, sid=sid, dim=dim,
                               cohort_size=cohort_size, threshold=threshold, own=own)
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


