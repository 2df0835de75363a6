"""A :class:`~fedproxy_secure.secagg.base.SecureSummer` that runs a mode's *network* stage machines.

``simulate`` sums client vectors with this summer, so its secure sums are computed by exactly the
server and client stage machines the networked federation runs (:mod:`fedproxy_secure.protocol.modes`):
same round config (cohort, threshold, enrolled Ed25519 identities, mode options), same messages
(through canonical JSON), same per-message validation, same dropout handling. Only the transport
(HTTPS, request signing, uploads) and the round engine's store are left out.
"""

from __future__ import annotations

import json
import time
from typing import Mapping

import numpy as np

from fedproxy_secure.errors import ProtocolAbort, SecurityError
from fedproxy_secure.wire.canonical import canonical_json
from fedproxy_secure.wire.codec import b64e
from fedproxy_secure.protocol.modes import RoundContext, resolve
from fedproxy_secure.protocol.settings import FederationSettings
from fedproxy_secure.secagg.base import STAGES, DropoutPlan, SecureSumResult

#: the DropoutPlan stage a mode's stage corresponds to (the plan speaks masking's stage names)
PLAN_STAGE = {"he_keys": "advertise", "he_input": "masked_input", "he_decrypt": "unmask"}


class StageMachineSummer:
    """Secure sums through the stage machines of network mode ``mode`` (``plain``, ``masking``, ``he``).

    ``clip_range``: every summed value lies in ``[-clip_range, clip_range]`` (the round's clip norm).
    Guarantees: the result is what a networked round of the same mode computes from the same vectors
    and dropouts; fewer than ``threshold`` survivors at any stage raises ``ProtocolAbort``.
    """

    def __init__(self, mode: str, clip_range: float = 1.0) -> None:
        self.mode = "plain" if mode == "none" else mode
        self.impl = resolve(self.mode)
        self.clip = float(clip_range)

    def secure_sum(self, vectors: Mapping[int, np.ndarray], *, threshold: int, session_id: bytes,
                   dropouts: DropoutPlan | None = None) -> SecureSumResult:
        """Sum over the clients that reach the end of the protocol (see the class docstring)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        t0 = time.perf_counter()
        ids = sorted(int(i) for i in vectors)
        if not ids:
            raise ProtocolAbort("secure sum: no client vectors")
        n = len(ids)
        dim = int(np.asarray(vectors[ids[0]]).shape[0])
        sid_of = {cid: k + 1 for k, cid in enumerate(ids)}
        gone_before = (lambda st: {sid_of[c] for c in dropouts.dropped_by(PLAN_STAGE.get(st, st)) if c in sid_of}) \
            if dropouts is not None else (lambda st: set())
        keys = {sid: Ed25519PrivateKey.generate() for sid in sid_of.values()}
        he_key = Ed25519PrivateKey.generate()
        # the key holder (HE) rotates with the round id: pick the first client that never drops
        never = [sid for sid in sorted(keys) if sid not in gone_before(STAGES[-1])]
        round_id = never[0] if never else 1
        s = FederationSettings(rounds=1, min_clients=max(n, 2), threshold=max(1, min(int(threshold), n)),
                               mode=self.mode, dim=dim, clip_norm=self.clip)
        cfg = {"round_id": round_id, "session_id": bytes(session_id).hex(), "mode": self.mode, "aggregator": "fedavg",
               "cohort": [[str(c), sid] for c, sid in sid_of.items()], "threshold": int(threshold), "dim": dim,
               "clip_norm": self.clip,
               "secagg_options": {"identities": {str(sid): b64e(k.public_key().public_bytes(Encoding.Raw,
                                                                                            PublicFormat.Raw))
                                                 for sid, k in keys.items()}, "max_clients": max(n, 2)}}
        for k, v in self.impl.round_options(s, round_id, n, bytes(session_id), he_key).items():
            cfg[k] = {**cfg[k], **v} if isinstance(cfg.get(k), dict) else v
        cfg = json.loads(canonical_json(cfg))  # as signed and sent
        # values are bounded per coordinate here (not in L2): plain's L2 norm check does not apply, as in
        # SA-H-TIES's plain phases; masking and HE bound every value by clip_range
        clip = None if self.mode == "plain" else self.clip
        server = self.impl.server_stages(RoundContext(config=cfg, dim=dim, clip_norm=clip, he_key=he_key))
        clients = {sid_of[c]: self.impl.client_stages(cfg, np.asarray(vectors[c], dtype=np.float64), sid_of[c],
                                                      identity_key=keys[sid_of[c]], used_sessions=set())
                   for c in ids}
        inbox: dict[int, dict] = {sid: {} for sid in clients}
        wire: dict[str, dict[str, float]] = {}
        for stage in self.impl.stages(s):
            inputs: dict[int, dict] = {}
            for sid in sorted(inbox):
                if sid in gone_before(stage):
                    continue
                try:
                    reply = json.loads(canonical_json(clients[sid].step(stage, inbox[sid])))
                    server.validate(stage, reply, sid)
                except (ProtocolAbort, SecurityError):
                    continue  # refused or gave up: counts as dropped, like on the network
                w = wire.setdefault(stage, {"up": 0.0, "down": 0.0})
                w["up"] += len(canonical_json(reply)) / n
                w["down"] += len(canonical_json(inbox[sid])) / n
                inputs[sid] = reply
            if len(inputs) < int(threshold):
                raise ProtocolAbort(f"only {len(inputs)} clients alive at stage {stage}, threshold {threshold}: "
                                    "round aborted")
            out = server.close(stage, inputs)
            if out is None:
                break
            inbox = {sid: json.loads(canonical_json(m)) for sid, m in out.items()}
        total, survivors = server.result()
        by_sid = {sid: c for c, sid in sid_of.items()}
        return SecureSumResult(np.asarray(total, dtype=np.float64), tuple(by_sid[i] for i in survivors), self.mode,
                               {"bytes_per_client": {k: {d: round(x, 1) for d, x in v.items()} for k, v in wire.items()},
                                "bytes_per_client_total": round(sum(v["up"] + v["down"] for v in wire.values()), 1),
                                "seconds": round(time.perf_counter() - t0, 4), "stage_machines": True})
