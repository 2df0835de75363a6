"""Both parties in one process: the real round engine and the real client stage machines, with the
HTTP transport replaced by direct calls (``submit`` / ``fetch``).

Everything a networked round does is here except TLS, request signing and uploads: the same
:class:`~fedproxy_secure.server.rounds.RoundEngine` (store, audit log, deadlines, replay), the same
signed round configs verified with the operator's public key, the same client stage machines from
:mod:`fedproxy_secure.protocol.modes`, messages passed through canonical JSON as on the wire. Used by
tests to exercise a mode end to end quickly, and to compare with a loopback network run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedproxy_secure.auditlog import AuditLog
from fedproxy_secure.errors import ProtocolAbort, SecurityError
from fedproxy_secure.wire.canonical import canonical_json
from fedproxy_secure.protocol.modes import make_client_stages
from fedproxy_secure.protocol.names import JOIN_STAGE, ROUND_CONFIG_DOMAIN
from fedproxy_secure.protocol.roundcfg import sign_round_config, state_from_bytes, verify_round_config
from fedproxy_secure.protocol.settings import FederationSettings
from fedproxy_secure.server.rounds import RoundEngine
from fedproxy_secure.server.store import RoundRow, SQLiteStore


class ManualClock:
    """A clock the driver advances past a deadline when some client stays silent."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t


@dataclass
class RoundOutcome:
    """A finished (or aborted) round: its row, the new global state and what each client saw."""

    row: RoundRow
    theta: np.ndarray | None
    conflict: np.ndarray | None
    refused: dict[str, str] = field(default_factory=dict)


class InMemoryFederation:
    """A federation of ``n`` enrolled clients (each with an Ed25519 identity) around one engine.

    ``tamper(stage, client_id, reply) -> reply`` may alter a client's reply before it is submitted
    (tests of refusals). Guarantees: every client message goes through canonical JSON, is validated
    by the engine before it is stored, and every server message a client acts on comes from
    ``engine.fetch`` after the round config was verified against the operator key.
    """

    def __init__(self, directory: str | os.PathLike, settings: FederationSettings, n: int, he_key=None) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.settings, self.clock = settings, ManualClock()
        self.store, self.audit = SQLiteStore(d / "state.db"), AuditLog(d / "audit.jsonl")
        self.audit_path = d / "audit.jsonl"
        self.operator = Ed25519PrivateKey.generate()
        if he_key is None and settings.mode == "he":
            he_key = Ed25519PrivateKey.generate()
        self.keys: dict[str, object] = {}
        self.used: dict[str, set] = {}
        for j in range(int(n)):
            k = Ed25519PrivateKey.generate()
            cid, _ = self.store.enroll(self.store.add_token(f"site{j}", 600),
                                       k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
            self.keys[cid], self.used[cid] = k, set()
        self.engine = RoundEngine(self.store, self.audit, settings, clock=self.clock, he_key=he_key,
                                  signer=lambda cfg, domain=ROUND_CONFIG_DOMAIN: sign_round_config(self.operator,
                                                                                                  cfg, domain))
        self.engine.recover()

    @property
    def clients(self) -> list[str]:
        """Client ids, sorted."""
        return sorted(self.keys)

    def run_round(self, updates: dict[str, np.ndarray], silent_from: dict[str, str] | None = None,
                  tamper=None, num_examples: dict[str, int] | None = None) -> RoundOutcome:
        """Run the open round: every client joins, then each stage; ``silent_from`` = {client: stage it
        stops answering at}. Returns the closed round and the new global state (None if aborted)."""
        silent_from = silent_from or {}
        from fedproxy_secure.wire.binding import graph_commit, new_graph_nonce

        rid = self.engine.current().round_id
        nonces = {c: new_graph_nonce() for c in self.clients}  # commit at join, reveal in the advertised keys
        for c in self.clients:
            self.engine.submit(c, rid, JOIN_STAGE, {"type": "join", "graph_commit": graph_commit(nonces[c]).hex()})
        row = self.store.get_round(rid)
        if row.status != "open":
            return RoundOutcome(row, None, None)
        cfg = verify_round_config(self.operator.public_key(), row.config)
        cohort = {c: i for c, i in cfg["cohort"]}
        stages = {c: make_client_stages(cfg, np.asarray(updates[c], dtype=np.float64), cohort[c],
                                        identity_key=self.keys[c], used_sessions=self.used[c],
                                        operator=self.operator.public_key(),
                                        num_examples=(num_examples or {}).get(c), graph_nonce=nonces[c])
                  for c in cohort}
        silent: set[str] = set()
        refused: dict[str, str] = {}
        for stage in self.engine.round_stages():
            if self.store.get_round(rid).status != "open":
                break
            for c in sorted(cohort):
                if silent_from.get(c) == stage:
                    silent.add(c)
                if c in silent:
                    continue
                st, msg = self.engine.fetch(c, rid, stage)
                if st != "ready":
                    silent.add(c)
                    continue
                try:
                    reply = stages[c].step(stage, msg)
                except (ProtocolAbort, SecurityError) as exc:
                    refused[c] = str(exc)
                    silent.add(c)
                    continue
                if tamper is not None:
                    reply = tamper(stage, c, reply)
                try:
                    self.engine.submit(c, rid, stage, json.loads(canonical_json(reply)))
                except (ProtocolAbort, SecurityError, LookupError, PermissionError) as exc:
                    refused[c] = str(exc)
                    silent.add(c)
            row = self.store.get_round(rid)
            if row.status == "open" and row.stage == stage:  # someone silent: let the deadline pass
                self.clock.t += 1e6
                self.engine.tick()
        row = self.store.get_round(rid)
        if row.status != "done":
            return RoundOutcome(row, None, None, refused)
        st = state_from_bytes(self.store.global_state()[1])
        return RoundOutcome(row, st["theta"], st.get("conflict"), refused)
