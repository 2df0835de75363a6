"""Helpers for tests/test_threat_*.py: drive one in-process masking session and keep the transcript."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from fedproxy_secure.secagg import messages as M
from fedproxy_secure.secagg.masking import ClientProtocol, MaskingConfig, ServerProtocol


@dataclass
class Transcript:
    """What the server saw in one masking session: every masked input and every unmask response."""

    session_id: bytes
    config: MaskingConfig
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    unmask: dict[int, M.UnmaskResponse] = field(default_factory=dict)
    result: np.ndarray | None = None


def run_masking_session(vectors: dict[int, np.ndarray], threshold: int = 2) -> Transcript:
    """Run advertise .. unmask for ``vectors`` (client id -> float vector in [-1, 1]) with no dropout.

    The session id is fresh (``os.urandom``); client keys and seeds are the protocol's own
    (OS randomness), as in a deployment. Returns the server's view of the session.
    """
    sid = os.urandom(32)
    length = int(next(iter(vectors.values())).shape[0])
    cfg = MaskingConfig(threshold, length)
    server = ServerProtocol(sid, cfg)
    clients = {i: ClientProtocol(i, sid, cfg, np.asarray(v, dtype=np.float64)) for i, v in sorted(vectors.items())}
    tr = Transcript(sid, cfg)
    for c in clients.values():
        assert server.receive(c.advertise())
    for _ in range(4):
        for i, msg in server.advance().items():
            reply = clients[i].handle(msg)
            if isinstance(reply, M.MaskedInput):
                tr.masked[i] = np.array(reply.vector, dtype=np.uint64)
            if isinstance(reply, M.UnmaskResponse):
                tr.unmask[i] = reply
            assert server.receive(reply), server.rejected
    server.advance()
    tr.result = server.result()
    return tr


class InProcessFederation:
    """A real :class:`RoundEngine` over SQLite with an operator key and ``n`` enrolled clients,
    driven in-process (no sockets): the server of the T04/T06/T08 tests."""

    def __init__(self, tmp_path, n: int = 3, **settings) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from fedproxy_secure.auditlog import AuditLog
        from fedproxy_secure.protocol.settings import FederationSettings
        from fedproxy_secure.server.store import SQLiteStore

        base = {"rounds": 1, "min_clients": n, "threshold": 2, "mode": "masking", "dim": 8, "clip_norm": 1.0}
        base.update(settings)
        self.settings = FederationSettings.from_dict(base)
        self.store = SQLiteStore(tmp_path / "state.db")
        self.audit_path = tmp_path / "audit.jsonl"
        self.audit = AuditLog(self.audit_path)
        self.op = Ed25519PrivateKey.generate()
        self.keys: dict = {}
        for j in range(n):
            self.add_client(f"s{j}", Ed25519PrivateKey.generate())
        self.eng = self._engine()
        self.eng.recover()

    def add_client(self, name: str, key) -> str:
        """Enrol ``key`` (Ed25519 private key) as site ``name``; returns its client id."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        cid, _ = self.store.enroll(self.store.add_token(name, 60), key.public_key().public_bytes(Encoding.Raw,
                                                                                                 PublicFormat.Raw))
        self.keys[cid] = key
        return cid

    def _engine(self):
        from fedproxy_secure.protocol.names import ROUND_CONFIG_DOMAIN
        from fedproxy_secure.protocol.roundcfg import sign_round_config
        from fedproxy_secure.server.rounds import RoundEngine

        return RoundEngine(self.store, self.audit, self.settings,
                           signer=lambda cfg, domain=ROUND_CONFIG_DOMAIN: sign_round_config(self.op, cfg, domain))

    def join_all(self) -> tuple[int, dict]:
        """Every client checks in; returns (round id, the signed round config)."""
        rid = self.eng.current().round_id
        for c in sorted(self.keys):
            self.eng.submit(c, rid, "join", {"type": "join"})
        return rid, self.store.get_round(rid).config

    def run_round(self, updates: dict) -> int:
        """One round in which client ``c`` sends ``updates[c]`` through the mode's stages, unclipped
        (what a malicious client can do); returns the round id."""
        import json

        from fedproxy_secure.protocol.modes import make_client_stages

        rid, cfg = self.join_all()
        cohort = {c: i for c, i in cfg["cohort"]}
        stages = {c: make_client_stages(cfg, updates[c], cohort[c], identity_key=self.keys[c], used_sessions=set(),
                                        operator=self.op.public_key()) for c in self.keys}
        for stage in self.eng.round_stages():
            if self.store.get_round(rid).status != "open":
                break
            for c in sorted(self.keys):
                st, msg = self.eng.fetch(c, rid, stage)
                assert st == "ready", (stage, st, msg)
                self.eng.submit(c, rid, stage, json.loads(json.dumps(stages[c].step(stage, msg))))
        return rid

    def audit_events(self) -> list[dict]:
        """The server's audit log entries, in order."""
        import json

        return [json.loads(x) for x in self.audit_path.read_text().splitlines()]
