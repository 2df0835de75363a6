"""Round-config signing and verification, and the global-state codec (both parties use these).

The operator signs each round config (Ed25519 over ``domain || canonical_json(config + kid)``);
a client verifies it against the pinned operator key before acting on any field. The global state
travels as safetensors bytes (never pickle).
"""

from __future__ import annotations

import numpy as np

from fedproxy_secure.errors import ProtocolAbort, SecurityError
from fedproxy_secure.wire.canonical import canonical_json
from fedproxy_secure.wire.codec import b64d, b64e
from fedproxy_secure.protocol.names import ROUND_CONFIG_DOMAIN

__all__ = ["sign_round_config", "verify_round_config", "state_to_bytes", "state_from_bytes", "ROUND_CONFIG_DOMAIN"]


def state_to_bytes(theta: np.ndarray, conflict: np.ndarray | None = None) -> bytes:
    """Global state as safetensors bytes (``theta`` and optional ``conflict``, float64)."""
    from safetensors.numpy import save

    t = {"theta": np.ascontiguousarray(theta, dtype=np.float64)}
    if conflict is not None:
        t["conflict"] = np.ascontiguousarray(conflict, dtype=np.float64)
    return save(t)


def state_from_bytes(blob: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`state_to_bytes` (safetensors only, never pickle)."""
    from safetensors.numpy import load

    return load(blob)


def sign_round_config(key, cfg: dict, domain: bytes = ROUND_CONFIG_DOMAIN) -> dict:
    """Return ``cfg`` plus ``kid`` and ``signature`` (Ed25519 over the canonical JSON of the rest).

    ``domain`` separates round configs from other operator-signed messages (SA-H-TIES phases).
    """
    from fedproxy_secure.artifacts.keys import key_id, sign

    body = dict(cfg)
    body["kid"] = key_id(key)
    sig = sign(key, domain, canonical_json(body))
    return {**body, "signature": b64e(sig)}


def verify_round_config(pub, cfg: dict, domain: bytes = ROUND_CONFIG_DOMAIN) -> dict:
    """Check the operator's signature on a round config; returns it without the signature.

    Raises ``SecurityError`` on a missing/bad signature or a key id other than ``pub``'s.
    """
    from fedproxy_secure.artifacts.keys import key_id, verify_signature

    if not isinstance(cfg, dict) or "signature" not in cfg or "kid" not in cfg:
        raise SecurityError("round config is not signed")
    body = {k: v for k, v in cfg.items() if k != "signature"}
    if body["kid"] != key_id(pub):
        raise SecurityError(f"round config signed by unknown key {str(body['kid'])[:16]}")
    try:
        raw = b64d(cfg["signature"], "round config signature", 64)
    except ProtocolAbort:
        raise SecurityError("round config signature is not base64") from None
    if not verify_signature(pub, raw, domain, canonical_json(body)):
        raise SecurityError("round config signature does not verify")
    return body
