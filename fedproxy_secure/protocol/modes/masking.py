"""Mode ``masking``: Bonawitz et al. pairwise-masking secure aggregation over :mod:`secagg.masking`.

Stages (client -> server message): ``advertise`` AdvertiseKeys, ``share`` ShareKeys,
``masked_input`` MaskedInput, ``consistency`` ConsistencyAck, ``unmask`` UnmaskResponse; the typed,
strictly validated message classes live in :mod:`fedproxy_secure.secagg.messages`. Closing a stage
runs ``ServerProtocol.advance`` and yields the server's message per client for the next stage.
Client advertised keys and consistency acks are signed with the enrolled Ed25519 identities listed
in the operator-signed round config, over the round's binding context (the signed config's digest:
sites given different configs abort before any masked input leaves). The SecAgg+ graph is keyed by
the commit-reveal seed of :mod:`fedproxy_secure.wire.binding` (``secagg_options.graph_commits``),
never by the server-drawn session id alone. A message the protocol refuses is recorded in
``rejections`` (the engine writes it to the audit log as ``reject``).
"""

from __future__ import annotations

import numpy as np

from fedproxy_secure.errors import ProtocolAbort
from fedproxy_secure.wire.codec import b64d
from fedproxy_secure.protocol.modes.base import ClientStages, Mode, RoundContext, ServerStages
from fedproxy_secure.protocol.names import MASKING_STAGES
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

    ids = (options or {}).get("identities")
    if not ids:
        return None
    return {int(k): Ed25519PublicKey.from_public_bytes(b64d(v, f"identity {k}", 32)) for k, v in ids.items()}


def check_message(stage: str, msg: dict, sid: int, session_id: bytes) -> None:
    """Refuse a message of the wrong type, session or sender id (``ProtocolAbort``)."""
    want = STAGE_TYPES.get(stage)
    if want is None or not isinstance(msg, dict) or msg.get("type") != want:
        got = msg.get("type") if isinstance(msg, dict) else type(msg).__name__
        raise ProtocolAbort(f"stage {stage} expects a {want} message, got {got!r}")
    m = M.message_from_dict(msg)
    if m.session_id != session_id:
        raise ProtocolAbort("message carries another session id")
    if m.client_id != sid:
        raise ProtocolAbort(f"message claims secagg id {m.client_id}, the sender is {sid}")


class MaskingServerStages:
    """Server side of a masking session as network stages (deterministic: replayable)."""

    stages = MASKING_STAGES

    def __init__(self, *, cohort: list[int], dim: int, threshold: int, session_id: bytes, clip_norm: float,
                 options: dict, context: bytes = b"") -> None:
        from fedproxy_secure.wire.binding import parse_graph_commits
        from fedproxy_secure.secagg.masking import ServerProtocol

        self.cfg = masking_config(threshold, dim, clip_norm, options)
        self.proto = ServerProtocol(session_id, self.cfg, peer_identities=identities(options), context=context,
                                    graph_commits=parse_graph_commits((options or {}).get("graph_commits")))
        self.cohort, self.session_id = set(cohort), bytes(session_id)
        self.rejections: dict[int, str] = {}

    def validate(self, stage: str, msg: dict, sid: int) -> None:
        """Refuse a message of the wrong type, session or sender id before it is stored."""
        check_message(stage, msg, sid, self.session_id)

    def close(self, stage: str, inputs: dict[int, dict]) -> dict[int, dict] | None:
        """Feed the stage's messages (in id order), advance, return next-stage messages.

        A message the protocol refuses is recorded in ``rejections[sid]`` with the protocol's reason.
        """
        for sid in sorted(inputs):
            if not self.proto.receive(M.message_from_dict(inputs[sid])):
                who, why = self.proto.rejected[-1]
                self.rejections[int(who) if who is not None else sid] = f"{stage}: {why}"
        out = self.proto.advance()
        if stage == self.stages[-1]:
            return None
        return {int(k): v.to_dict() for k, v in out.items()}

    def result(self) -> tuple[np.ndarray, tuple[int, ...]]:
        """Decoded float sum over the survivors (U3) and the survivors."""
        total = self.cfg.encoder.decode(self.proto.result())
        return np.asarray(total, dtype=np.float64), tuple(self.proto.u3)


class MaskingClientStages:
    """Client side over :class:`fedproxy_secure.secagg.masking.ClientProtocol`."""

    stages = MASKING_STAGES

    def __init__(self, vector: np.ndarray, *, sid: int, session_id: bytes, threshold: int, dim: int,
                 clip_norm: float, options: dict, identity_key=None, used_sessions: set | None = None,
                 context: bytes = b"", graph_nonce: bytes | None = None) -> None:
        from fedproxy_secure.wire.binding import parse_graph_commits
        from fedproxy_secure.secagg.masking import ClientProtocol

        cfg = masking_config(threshold, dim, clip_norm, options)
        peers = identities(options)
        self.proto = ClientProtocol(sid, session_id, cfg, np.asarray(vector, dtype=np.float64),
                                    used_sessions=used_sessions,
                                    identity_key=identity_key if peers is not None else None,
                                    peer_identities=peers, context=context,
                                    graph_commits=parse_graph_commits((options or {}).get("graph_commits")),
                                    graph_nonce=graph_nonce or b"")

    def step(self, stage: str, server_msg: dict) -> dict:
        """Validate the server's message for ``stage`` and return the reply (or ``ProtocolAbort``)."""
        if stage == "advertise":
            return self.proto.advertise().to_dict()
        return self.proto.handle(M.message_from_dict(server_msg)).to_dict()


class MaskingMode(Mode):
    """Pairwise masking with Shamir-shared seeds (dropout-robust, t-of-n)."""

    name = "masking"
    base_stages = MASKING_STAGES

    def server_stages(self, ctx: RoundContext) -> ServerStages:
        """Masking server stages of the round."""
        return MaskingServerStages(cohort=ctx.cohort, dim=ctx.dim, threshold=int(ctx.config["threshold"]),
                                   session_id=ctx.session_id, clip_norm=ctx.clip_norm,
                                   options=ctx.config.get("secagg_options", {}), context=ctx.context_digest)

    def client_stages(self, cfg: dict, vector: np.ndarray, sid: int, *, identity_key=None,
                      used_sessions: set | None = None, operator=None, context: bytes | None = None,
                      graph_nonce: bytes | None = None) -> ClientStages:
        """Masking client stages for a verified round config (``context``: default its digest)."""
        from fedproxy_secure.wire.binding import round_config_digest

        return MaskingClientStages(vector, sid=sid, session_id=bytes.fromhex(cfg["session_id"]),
                                   threshold=cfg["threshold"], dim=cfg["dim"], clip_norm=cfg["clip_norm"],
                                   options=cfg.get("secagg_options", {}), identity_key=identity_key,
                                   used_sessions=used_sessions,
                                   context=round_config_digest(cfg) if context is None else context,
                                   graph_nonce=graph_nonce)
