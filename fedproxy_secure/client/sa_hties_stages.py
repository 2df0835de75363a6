"""Client side of an SA-H-TIES round (mirror of ``server/sa_hties_stages.py``).

Phase A secure-sums ``[Δ̂, sgn Δ]`` of the update divided by ``clip_norm``. Then the client takes
the server's operator-signed phase messages, verifies the signature (domain ``PHASE_DOMAIN``) and
every field (``check_phase_a_message`` / ``check_phase_b_message``), computes ``h_i`` (revealed in
``h_norm: reveal`` mode) and its phase-B vectors locally, and secure-sums them in a second,
complete session whose id was announced in the signed round config. Both session ids are
reserved in ``used_sessions`` before any key leaves the client, so neither is ever reused.
"""

from __future__ import annotations

import numpy as np

from fedproxy_secure.aggregate.sa_hties import pack, sa_client_h, sa_phase_a_client, sa_phase_b_client
from fedproxy_secure.errors import ConfigError, ProtocolAbort, SecurityError
from fedproxy_secure.server.sa_hties_stages import (
    B_PREFIX,
    PHASE_A_PARTS,
    PHASE_B_PARTS,
    PHASE_CLIP,
    PHASE_DOMAIN,
    REVEAL_STAGE,
    _mode_stages,
    base_stage,
    check_phase_a_message,
    check_phase_b_message,
    h_message,
    round_stages,
    sa_options,
)


def _session(x: object, what: str) -> bytes:
    if not isinstance(x, str) or len(x) != 64:
        raise ProtocolAbort(f"round config: {what} must be 32 bytes of hex")
    try:
        return bytes.fromhex(x)
    except ValueError:
        raise ProtocolAbort(f"round config: {what} is not hex") from None


class SAHTiesClientStages:
    """One client's SA-H-TIES round over the mode's client stages (masking or plain)."""

    def __init__(self, cfg: dict, vector: np.ndarray, sid: int, *, operator, identity_key=None,
                 used_sessions: set | None = None) -> None:
        """``cfg``: the verified round config; ``vector``: our clipped update; ``operator``: the pinned
        operator public key that must sign the phase messages."""
        if operator is None:
            raise ProtocolAbort("SA-H-TIES needs the operator's public key to check the phase messages")
        sa = cfg.get("sa_hties")
        if not isinstance(sa, dict):
            raise ProtocolAbort("round config: aggregator sa_hties without an sa_hties section")
        try:
            self.opts = sa_options({k: v for k, v in sa.items() if k != "session_id_b"})
            self.base = _mode_stages(cfg["mode"])
        except ConfigError as exc:
            raise ProtocolAbort(f"round config: {exc}") from None
        self.session_a = _session(cfg["session_id"], "session_id")
        self.session_b = _session(sa.get("session_id_b"), "sa_hties.session_id_b")
        if self.session_b == self.session_a:
            raise ProtocolAbort("round config: phase B reuses the phase-A session id: refusing")
        if used_sessions is not None and self.session_b in used_sessions:
            raise ProtocolAbort("round config: phase-B session id already used: refusing (replay)")
        self.cfg, self.sid, self.operator, self.key = cfg, int(sid), operator, identity_key
        self.mode, self.dim, self.t = cfg["mode"], int(cfg["dim"]), int(cfg["threshold"])
        self.cohort_size = len(cfg["cohort"])
        self.clip = float(cfg["clip_norm"])
        u = np.asarray(vector, dtype=np.float64)
        if u.shape != (self.dim,) or not np.all(np.isfinite(u)):
            raise ProtocolAbort(f"SA-H-TIES: update must be {self.dim} finite values")
        self.x = np.clip(u / self.clip, -1.0, 1.0)  # the caller clipped ‖u‖ <= clip_norm
        self.stages = round_stages(self.base, self.opts.h_norm)
        self.a = self._phase(pack(sa_phase_a_client(self.x)), self.session_a, [i for _, i in cfg["cohort"]],
                             used_sessions)
        if used_sessions is not None:
            used_sessions.add(self.session_b)  # reserved now, persisted by the caller before any key leaves
        self.b = None
        self.T = None
        self.K: int | None = None
        self.h: float | None = None
        self.phase_a: dict | None = None
        self.phase_b: dict | None = None

    def _phase(self, vector: np.ndarray, session: bytes, cohort: list[int], used_sessions):
        if self.mode in ("plain", "none"):
            from fedproxy_secure.client.stages import PlainClientStages

            return PlainClientStages(vector)
        from fedproxy_secure.client.stages import MaskingClientStages

        opts = dict(self.cfg.get("secagg_options", {}))
        if "identities" in opts:
            opts["identities"] = {k: v for k, v in opts["identities"].items() if int(k) in set(cohort)}
        return MaskingClientStages(vector, sid=self.sid, session_id=session, threshold=self.t, dim=vector.size,
                                   clip_norm=PHASE_CLIP, options=opts, identity_key=self.key,
                                   used_sessions=used_sessions)

    def _verified(self, msg: object, kind: str) -> dict:
        from fedproxy_secure.server.rounds import verify_round_config

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
                                                   threshold=self.t)
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
            phase_a=self.phase_a)
        self.T, self.K, self.phase_b = t, k, body
        msg = sa_phase_b_client(self.x, t, None, self.opts.params(), num_clients=k, h_range=h_range)
        v = pack(msg.vectors)
        if v.size != PHASE_B_PARTS * self.dim or float(np.max(np.abs(v), initial=0.0)) > PHASE_CLIP:
            raise ProtocolAbort("phase-B vectors outside [-1, 1]")  # cannot happen for ‖x‖_inf <= 1
        self.b = self._phase(v, self.session_b, cohort_b, None)  # session_b already reserved in used_sessions
        return self.b.step(base, {})


__all__ = ["SAHTiesClientStages", "PHASE_A_PARTS"]
