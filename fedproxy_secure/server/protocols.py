"""Server side of each secure-aggregation mode, as a sequence of JSON message stages.

The round engine only knows this interface: ``stages`` (in order), ``close(stage, inputs)`` with
the JSON messages the surviving clients sent at that stage (keyed by their secagg id) returning
the server's JSON message for each client at the next stage (``None`` after the last stage), and
``result()`` giving the sum over survivors. ``close`` must be deterministic in its inputs: after a
restart the engine rebuilds the state by replaying the stored messages of the closed stages.
"""

from __future__ import annotations

import base64
from typing import Protocol

import numpy as np

from fedproxy_secure.errors import ProtocolAbort


class ServerStages(Protocol):
    """Server side of one secure-aggregation session."""

    stages: tuple[str, ...]

    def close(self, stage: str, inputs: dict[int, dict]) -> dict[int, dict] | None: ...
    def result(self) -> tuple[np.ndarray, tuple[int, ...]]: ...


def vec_to_b64(v: np.ndarray) -> str:
    """float64 little-endian bytes as base64."""
    return base64.b64encode(np.ascontiguousarray(v, dtype="<f8").tobytes()).decode()


def vec_from_b64(s: object, dim: int) -> np.ndarray:
    """Inverse of :func:`vec_to_b64`; ``ProtocolAbort`` unless ``dim`` finite float64 values."""
    if not isinstance(s, str):
        raise ProtocolAbort("vector: expected a base64 string")
    try:
        raw = base64.b64decode(s, validate=True)
    except ValueError:
        raise ProtocolAbort("vector: invalid base64") from None
    if len(raw) != 8 * dim:
        raise ProtocolAbort(f"vector: {len(raw) // 8} values, expected {dim}")
    v = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    if not np.all(np.isfinite(v)):
        raise ProtocolAbort("vector: non-finite values")
    return v


class PlainStages:
    """No protection (baseline): each client sends its vector in the clear at ``masked_input``."""

    stages = ("masked_input",)

    def __init__(self, cohort: list[int], dim: int, threshold: int, clip_norm: float | None = None, **_) -> None:
        self.cohort, self.dim, self.threshold, self.clip = set(cohort), dim, threshold, clip_norm
        self._sum: np.ndarray | None = None
        self._survivors: tuple[int, ...] = ()

    def close(self, stage: str, inputs: dict[int, dict]) -> dict[int, dict] | None:
        """Sum the plaintext vectors; refuse a vector whose norm exceeds the clip norm."""
        total = np.zeros(self.dim)
        for cid, msg in sorted(inputs.items()):
            if not isinstance(msg, dict) or msg.get("type") != "plain_input" or set(msg) != {"type", "vector"}:
                raise ProtocolAbort(f"client {cid}: malformed plain_input")
            v = vec_from_b64(msg["vector"], self.dim)
            if self.clip and np.linalg.norm(v) > self.clip * (1 + 1e-6):
                raise ProtocolAbort(f"client {cid}: update norm exceeds the clip norm")
            total += v
        self._sum, self._survivors = total, tuple(sorted(inputs))
        return None

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        """Sum and survivors."""
        assert self._sum is not None
        return self._sum, self._survivors

    @staticmethod
    def validate(stage: str, msg: dict, dim: int) -> None:
        """Check one client message when it arrives (before it is stored)."""
        if msg.get("type") != "plain_input" or set(msg) != {"type", "vector"}:
            raise ProtocolAbort("malformed plain_input")
        vec_from_b64(msg["vector"], dim)


def make_server_stages(mode: str, *, cohort: list[int], dim: int, threshold: int, session_id: bytes,
                       clip_norm: float, options: dict | None = None, signing_key=None) -> ServerStages:
    """Server stages for ``mode`` (``plain`` | ``masking`` | ``he``).

    ``signing_key`` (Ed25519, ``he`` only) signs the contribution statement the key holder checks;
    its public key is in the operator-signed round config.
    """
    if mode in ("plain", "none"):
        return PlainStages(cohort, dim, threshold, clip_norm)
    if mode == "masking":
        from fedproxy_secure.server.masking_stages import MaskingServerStages

        return MaskingServerStages(cohort=cohort, dim=dim, threshold=threshold, session_id=session_id,
                                   clip_norm=clip_norm, options=options or {})
    if mode == "he":
        from fedproxy_secure.server.he_stages import HEServerStages

        return HEServerStages(cohort=cohort, dim=dim, threshold=threshold, session_id=session_id,
                              clip_norm=clip_norm, options=options or {}, signing_key=signing_key)
    raise ProtocolAbort(f"secagg.mode {mode!r} is not available over the network; use masking, he or plain")
