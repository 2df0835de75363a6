"""Mode ``plain`` (alias ``none``): no protection, each client sends its vector in the clear.

For baselines only. One stage, ``masked_input``, carrying ``{type: plain_input, vector}``; the
server refuses a vector whose norm exceeds the clip norm and sums the rest.
"""

from __future__ import annotations

import numpy as np

from fedproxy_secure.errors import ProtocolAbort
from fedproxy_secure.wire.codec import vec_from_b64, vec_to_b64
from fedproxy_secure.protocol.modes.base import ClientStages, Mode, RoundContext, ServerStages
from fedproxy_secure.protocol.names import PLAIN_STAGES

PLAIN_INPUT = "plain_input"


def plain_input(vector: np.ndarray) -> dict:
    """The client's ``plain_input`` message."""
    return {"type": PLAIN_INPUT, "vector": vec_to_b64(vector)}


def check_plain_input(msg: object, dim: int) -> np.ndarray:
    """The vector of a well-formed ``plain_input`` message of ``dim`` finite values, else ``ProtocolAbort``."""
    if not isinstance(msg, dict) or msg.get("type") != PLAIN_INPUT or set(msg) != {"type", "vector"}:
        raise ProtocolAbort("malformed plain_input")
    return vec_from_b64(msg["vector"], dim)


class PlainServerStages:
    """Server side: sum the plaintext vectors; refuse a vector whose norm exceeds the clip norm."""

    stages = PLAIN_STAGES

    def __init__(self, cohort: list[int], dim: int, threshold: int, clip_norm: float | None = None, **_) -> None:
        self.cohort, self.dim, self.threshold, self.clip = set(cohort), dim, threshold, clip_norm
        self._sum: np.ndarray | None = None
        self._survivors: tuple[int, ...] = ()
        self.rejections: dict[int, str] = {}

    def validate(self, stage: str, msg: dict, sid: int) -> None:
        """Check one client message when it arrives (before it is stored)."""
        check_plain_input(msg, self.dim)

    def close(self, stage: str, inputs: dict[int, dict]) -> dict[int, dict] | None:
        """Sum the plaintext vectors (``ProtocolAbort`` on a malformed or over-norm vector)."""
        total = np.zeros(self.dim)
        for cid, msg in sorted(inputs.items()):
            try:
                v = check_plain_input(msg, self.dim)
            except ProtocolAbort:
                raise ProtocolAbort(f"client {cid}: malformed plain_input") from None
            if self.clip and np.linalg.norm(v) > self.clip * (1 + 1e-6):
                raise ProtocolAbort(f"client {cid}: update norm exceeds the clip norm")
            total += v
        self._sum, self._survivors = total, tuple(sorted(inputs))
        return None

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        """Sum and survivors."""
        if self._sum is None:
            raise ProtocolAbort("plain: no sum yet")
        return self._sum, self._survivors


class PlainClientStages:
    """Client side: send the vector in the clear."""

    stages = PLAIN_STAGES

    def __init__(self, vector: np.ndarray, **_) -> None:
        self.v = np.asarray(vector, dtype=np.float64)

    def step(self, stage: str, server_msg: dict) -> dict:
        """The message to post at ``stage``."""
        return plain_input(self.v)


class PlainMode(Mode):
    """No secure aggregation (baselines)."""

    name = "plain"
    aliases = ("none",)
    base_stages = PLAIN_STAGES

    def server_stages(self, ctx: RoundContext) -> ServerStages:
        """Plain server stages over the round's cohort."""
        return PlainServerStages(ctx.cohort, ctx.dim, int(ctx.config["threshold"]), ctx.clip_norm)

    def client_stages(self, cfg: dict, vector: np.ndarray, sid: int, **_) -> ClientStages:
        """Plain client stages."""
        return PlainClientStages(vector)
