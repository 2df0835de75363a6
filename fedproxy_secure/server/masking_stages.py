"""Network stages of masking-mode secure aggregation over :mod:`fedproxy_secure.secagg.masking`.

Stage ``advertise`` carries AdvertiseKeys, ``share`` ShareKeys, ``masked_input`` MaskedInput,
``consistency`` ConsistencyAck and ``unmask`` UnmaskResponse (client -> server); closing a stage
runs ``ServerProtocol.advance`` and yields the server's message per client for the next stage.
Client advertised keys and consistency acks are signed with the enrolled Ed25519 identities
listed in the operator-signed round config.
"""

from __future__ import annotations

import base64

import numpy as np

from fedproxy_secure.errors import ProtocolAbort
from fedproxy_secure.secagg import messages as M

STAGE_TYPES = {"advertise": "advertise_keys", "share": "share_keys", "masked_input": "masked_input",
               "consistency": "consistency_ack", "unmask": "unmask_response"}


def masking_config(threshold: int, dim: int, clip_norm: float, options: dict | None = None):
    """The public masking parameters every party derives from the round config."""
    from fedproxy_secure.secagg.encoding import FixedPointEncoder
    from fedproxy_secure.secagg.masking import MaskingConfig

    o = options or {}
    enc = FixedPointEncoder(clip_range=float(clip_norm), frac_bits=int(o.get("frac_bits", 32)),
                            max_clients=int(o.get("max_clients", 1024)))
    return MaskingConfig(threshold=threshold, vector_length=dim, encoder=enc, neighbours=o.get("neighbours"))


def identities(options: dict) -> dict | None:
    """Ed25519 identities by secagg id from the round config's ``identities`` option."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    ids = options.get("identities")
    if not ids:
        return None
    return {int(k): Ed25519PublicKey.from_public_bytes(base64.b64decode(v)) for k, v in ids.items()}


class MaskingServerStages:
    """Server side of a masking session as network stages (deterministic: replayable)."""

    stages = ("advertise", "share", "masked_input", "consistency", "unmask")

    def __init__(self, *, cohort: list[int], dim: int, threshold: int, session_id: bytes, clip_norm: float,
                 options: dict) -> None:
        from fedproxy_secure.secagg.masking import ServerProtocol

        self.cfg = masking_config(threshold, dim, clip_norm, options)
        self.proto = ServerProtocol(session_id, self.cfg, peer_identities=identities(options))
        self.cohort = set(cohort)
        self.rejected: list = []

    @staticmethod
    def validate(stage: str, msg: dict, sid: int, session_id: bytes) -> None:
        """Refuse a message of the wrong type, session or sender id before it is stored."""
        want = STAGE_TYPES.get(stage)
        if want is None or msg.get("type") != want:
            raise ProtocolAbort(f"stage {stage} expects a {want} message, got {msg.get('type')!r}")
        m = M.message_from_dict(msg)
        if m.session_id != session_id:
            raise ProtocolAbort("message carries another session id")
        if m.client_id != sid:
            raise ProtocolAbort(f"message claims secagg id {m.client_id}, the sender is {sid}")

    def close(self, stage: str, inputs: dict[int, dict]) -> dict[int, dict] | None:
        """Feed the stage's messages (in id order), advance, return next-stage messages."""
        for sid in sorted(inputs):
            if not self.proto.receive(M.message_from_dict(inputs[sid])):
                self.rejected.append(self.proto.rejected[-1])
        out = self.proto.advance()
        if stage == self.stages[-1]:
            return None
        return {int(k): v.to_dict() for k, v in out.items()}

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        """Decoded float sum over the survivors (U3) and the survivors."""
        total = self.cfg.encoder.decode(self.proto.result())
        return np.asarray(total, dtype=np.float64), tuple(self.proto.u3)
