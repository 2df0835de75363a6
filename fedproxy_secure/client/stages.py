"""Client side of each secure-aggregation mode as network stages (mirror of ``server/protocols``)."""

from __future__ import annotations

import base64

import numpy as np

from fedproxy_secure.errors import ProtocolAbort
from fedproxy_secure.server.protocols import vec_to_b64


class PlainClientStages:
    """Plain mode: send the vector in the clear (baselines only)."""

    stages = ("masked_input",)

    def __init__(self, vector: np.ndarray, **_) -> None:
        self.v = np.asarray(vector, dtype=np.float64)

    def step(self, stage: str, server_msg: dict) -> dict:
        """The message to post at ``stage``."""
        return {"type": "plain_input", "vector": vec_to_b64(self.v)}


class MaskingClientStages:
    """Masking mode over :class:`fedproxy_secure.secagg.masking.ClientProtocol`."""

    stages = ("advertise", "share", "masked_input", "consistency", "unmask")

    def __init__(self, vector: np.ndarray, *, sid: int, session_id: bytes, threshold: int, dim: int,
                 clip_norm: float, options: dict, identity_key=None, used_sessions: set | None = None) -> None:
        from fedproxy_secure.secagg.masking import ClientProtocol
        from fedproxy_secure.server.masking_stages import identities, masking_config

        cfg = masking_config(threshold, dim, clip_norm, options)
        peers = identities(options)
        self.proto = ClientProtocol(sid, session_id, cfg, np.asarray(vector, dtype=np.float64),
                                    used_sessions=used_sessions,
                                    identity_key=identity_key if peers is not None else None,
                                    peer_identities=peers)

    def step(self, stage: str, server_msg: dict) -> dict:
        """Validate the server's message for ``stage`` and return the reply (or ``ProtocolAbort``)."""
        from fedproxy_secure.secagg import messages as M

        if stage == "advertise":
            return self.proto.advertise().to_dict()
        return self.proto.handle(M.message_from_dict(server_msg)).to_dict()


def make_client_stages(cfg: dict, vector: np.ndarray, sid: int, identity_key=None, used_sessions=None,
                       operator=None):
    """Client stages for the mode (and aggregator) named in a verified round config.

    ``operator``: the pinned operator public key; aggregator ``sa_hties`` needs it to verify the
    signed phase messages (``client/sa_hties_stages.py``).
    """
    mode = cfg["mode"]
    if cfg.get("aggregator") == "sa_hties":
        from fedproxy_secure.client.sa_hties_stages import SAHTiesClientStages

        return SAHTiesClientStages(cfg, vector, sid, operator=operator, identity_key=identity_key,
                                   used_sessions=used_sessions)
    if mode in ("plain", "none"):
        return PlainClientStages(vector)
    if mode == "masking":
        return MaskingClientStages(vector, sid=sid, session_id=bytes.fromhex(cfg["session_id"]),
                                   threshold=cfg["threshold"], dim=cfg["dim"], clip_norm=cfg["clip_norm"],
                                   options=cfg.get("secagg_options", {}), identity_key=identity_key,
                                   used_sessions=used_sessions)
    if mode == "he":
        from fedproxy_secure.client.he_stages import HEClientStages

        return HEClientStages(vector, sid=sid, session_id=bytes.fromhex(cfg["session_id"]), threshold=cfg["threshold"],
                              dim=cfg["dim"], clip_norm=cfg["clip_norm"], cohort=[i for _, i in cfg["cohort"]],
                              options=cfg.get("secagg_options", {}), identity_key=identity_key,
                              used_sessions=used_sessions)
    raise ProtocolAbort(f"round config mode {mode!r} is not supported by this client")
