"""What a secure-aggregation mode provides, and what the round engine may call on it.

A mode (one file under ``protocol/modes/``) is a :class:`Mode`: its stage names and default
deadlines, its use of the threshold rule, validation of its settings section, the per-round
options it adds to the signed round config, the server and client stage machines of one round,
and :meth:`Mode.finish`, which turns the server stages' result into the global step through
:mod:`fedproxy_secure.aggregate`. The engine (``server/rounds.py``) only ever calls what is
declared here, so a new mode is one new file plus its registration (:func:`register_mode`).
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import numpy as np

from fedproxy_secure.wire.threshold import effective_threshold


class ServerStages(Protocol):
    """Server side of one round of a mode: a deterministic (replayable) stage machine."""

    stages: tuple[str, ...]
    #: secagg id -> why that client's message was refused (reaches the audit log as ``reject``)
    rejections: dict[int, str]

    def validate(self, stage: str, msg: dict, sid: int) -> None:
        """Refuse one client message on arrival, before it is stored (``ProtocolAbort``/``SecurityError``)."""

    def close(self, stage: str, inputs: dict[int, dict]) -> dict[int, dict] | None:
        """Close ``stage`` with the survivors' messages; the next stage's message per client, None at the end."""

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        """The secure sum and the secagg ids it is over."""


class ClientStages(Protocol):
    """Client side of one round of a mode."""

    stages: tuple[str, ...]

    def step(self, stage: str, server_msg: dict) -> dict:
        """Check the server's message for ``stage`` and return the client's reply."""


@dataclass(frozen=True)
class RoundContext:
    """What the engine hands a mode to build one round's server stages.

    ``config`` is the round config as signed (cohort, threshold, secagg_options, mode sections);
    ``he_key`` the server's HE statement key (None when the server has none); ``phase_signer``
    signs operator phase messages under the given domain; ``context`` the binding context of the
    session (default: the digest of ``config``; a composite's sub-session passes its own).
    """

    config: dict
    dim: int
    clip_norm: float
    he_key: Any = None
    phase_signer: Callable[[dict, bytes], dict] | None = None
    context: bytes | None = None

    @property
    def context_digest(self) -> bytes:
        """What every site binds into this session's key agreement (:mod:`wire.binding`)."""
        from fedproxy_secure.wire.binding import round_config_digest

        return self.context if self.context is not None else round_config_digest(self.config)

    @property
    def cohort(self) -> list[int]:
        """Secagg ids of the round's cohort, sorted."""
        return sorted(int(i) for _, i in self.config["cohort"])

    @property
    def session_id(self) -> bytes:
        """The round's session id."""
        return bytes.fromhex(self.config["session_id"])


@dataclass
class Finish:
    """A mode's outcome of a round: the global step, optional conflict state, survivors (secagg ids),
    facts for the stored result and for the audit line."""

    delta: np.ndarray
    survivors: tuple[int, ...]
    conflict: np.ndarray | None = None
    result: dict = field(default_factory=dict)
    audit: dict = field(default_factory=dict)


def vec_sha256(v: np.ndarray) -> str:
    """SHA-256 hex of ``v`` as little-endian float64 bytes."""
    return hashlib.sha256(np.ascontiguousarray(v, dtype="<f8").tobytes()).hexdigest()


class Mode(abc.ABC):
    """Base of every mode; subclasses set ``name``, ``stages`` and the two stage machines (abstract: a mode
    without both cannot be instantiated, so it fails at registration, not mid-round)."""

    name: ClassVar[str] = ""
    #: aliases accepted in settings (``none`` for ``plain``)
    aliases: ClassVar[tuple[str, ...]] = ()
    base_stages: ClassVar[tuple[str, ...]] = ()
    deadlines: ClassVar[dict[str, float]] = {}
    #: the settings section this mode owns (``federation.<section>``), if any
    settings_section: ClassVar[str | None] = None

    # -- settings -------------------------------------------------------------------------
    def validate_settings(self, s) -> None:
        """Raise ``ConfigError`` naming the field for any value of ``s`` this mode cannot run (none here)."""
        return None

    def stages(self, s) -> tuple[str, ...]:
        """Every stage of a round after ``join``."""
        return self.base_stages

    def deadline(self, s, stage: str) -> float:
        """Seconds ``stage`` stays open (settings override the mode's defaults)."""
        d = s.deadlines
        return float(d.get(stage, self.deadlines.get(stage, 30.0)))

    def threshold(self, s, n: int) -> int:
        """The threshold of a round of ``n`` clients (the one rule in :mod:`wire.threshold`)."""
        return effective_threshold(s.mode, n, s.threshold, s.aggregator)

    def check_server(self, he_key) -> None:
        """Raise ``ConfigError`` if the server lacks a key this mode needs (called once at start)."""

    # -- one round ---------------------------------------------------------------------------
    def round_options(self, s, round_id: int, n: int, session_id: bytes, he_key) -> dict:
        """Extra fields of the signed round config: ``{"secagg_options": {...}, "<section>": {...}}``.

        Raises ``ProtocolAbort`` to abort the round (e.g. a cohort too large for the parameters).
        """
        return {}

    @abc.abstractmethod
    def server_stages(self, ctx: RoundContext) -> ServerStages:
        """Fresh server stages of one round."""

    @abc.abstractmethod
    def client_stages(self, cfg: dict, vector: np.ndarray, sid: int, *, identity_key=None,
                      used_sessions: set | None = None, operator=None, context: bytes | None = None,
                      graph_nonce: bytes | None = None) -> ClientStages:
        """Fresh client stages for a verified round config.

        ``context``: the binding context to sign into the key agreement (default: the digest of
        ``cfg``, :func:`wire.binding.round_config_digest`); ``graph_nonce``: the nonce this site
        committed to at ``join`` (modes without a graph ignore it)."""

    def result_info(self, proto: ServerStages, names: dict[int, str]) -> dict:
        """Public facts of the round for the stored result, under the mode's name (none by default)."""
        return {}

    def finish(self, proto: ServerStages, theta: np.ndarray, s, names: dict[int, str]) -> Finish:
        """FedAvg over the survivors from the secure sum (``ProtocolAbort`` refuses the update).

        ``names`` maps secagg ids to client ids (for facts that name clients).
        """
        from fedproxy_secure.aggregate.fedavg import fedavg_from_sum
        from fedproxy_secure.errors import ProtocolAbort

        from fedproxy_secure.protocol.weighting import split_weighted_sum

        total, survivors = proto.result()
        k = len(survivors)
        weight = float(k)  # uniform: FedAvg over the survivors
        if s.weighting == "examples":  # Σ w_i Δ_i and Σ w_i (protocol/weighting.py)
            total, weight = split_weighted_sum(total, s.clip_norm)
            if not weight > 0 or weight > k * (1 + 1e-6):
                raise ProtocolAbort(f"example weights sum to {weight:.6g}, outside (0, {k}]: refusing the update")
        norm = float(np.linalg.norm(total))
        if norm > k * s.clip_norm * (1 + 1e-3) + 1e-6:
            raise ProtocolAbort(f"aggregate norm {norm:.4g} exceeds {k} x clip norm: refusing the update")
        delta = fedavg_from_sum(total, weight)
        result = {"sum_sha256": vec_sha256(total), "sum_b64": _b64(total), "aggregate_norm": norm,
                  "weight_sum": weight, "delta_norm": float(np.linalg.norm(delta))}
        info = self.result_info(proto, names)
        if info:
            result[self.name] = info
        return Finish(delta=delta, survivors=tuple(survivors), result=result, audit={"aggregate_norm": norm})


def _b64(v: np.ndarray) -> str:
    from fedproxy_secure.wire.codec import vec_to_b64

    return vec_to_b64(v)
