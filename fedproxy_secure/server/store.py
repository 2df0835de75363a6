"""Durable federation state behind a small storage interface.

:class:`Storage` is the interface the server uses; :class:`SQLiteStore` implements it on SQLite in
WAL mode with ``synchronous=FULL``: every method that changes state runs in one transaction and
returns only after the commit, so a state change is durable before the server acknowledges it.
Nothing here is pickled: blobs are the bytes clients sent (JSON / msgpack / safetensors).
A PostgreSQL store needs the same tables and the same methods.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedproxy_secure.errors import SecurityError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (token_id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL,
  name TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL, used_at REAL);
CREATE TABLE IF NOT EXISTS enrolments (client_id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,
  pubkey BLOB NOT NULL, enrolled_at REAL NOT NULL, status TEXT NOT NULL DEFAULT 'active');
CREATE TABLE IF NOT EXISTS nonces (client_id TEXT NOT NULL, nonce TEXT NOT NULL,
  expires_at REAL NOT NULL, PRIMARY KEY (client_id, nonce));
CREATE TABLE IF NOT EXISTS rounds (round_id INTEGER PRIMARY KEY, session_id TEXT NOT NULL UNIQUE,
  status TEXT NOT NULL, stage TEXT NOT NULL, stage_deadline REAL NOT NULL, config TEXT NOT NULL,
  opened_at REAL NOT NULL, closed_at REAL, reason TEXT, result TEXT);
CREATE TABLE IF NOT EXISTS transitions (id INTEGER PRIMARY KEY AUTOINCREMENT, round_id INTEGER NOT NULL,
  stage TEXT NOT NULL, ts REAL NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS submissions (round_id INTEGER NOT NULL, stage TEXT NOT NULL,
  client_id TEXT NOT NULL, body BLOB NOT NULL, accepted_at REAL NOT NULL,
  PRIMARY KEY (round_id, stage, client_id));
CREATE TABLE IF NOT EXISTS global_state (round_id INTEGER PRIMARY KEY, blob BLOB NOT NULL,
  sha256 TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS client_reports (round_id INTEGER NOT NULL, client_id TEXT NOT NULL,
  report TEXT NOT NULL, PRIMARY KEY (round_id, client_id));
"""


@dataclass(frozen=True)
class RoundRow:
    """One round as stored."""

    round_id: int
    session_id: str
    status: str  # open | done | aborted
    stage: str
    stage_deadline: float
    config: dict
    opened_at: float
    closed_at: float | None
    reason: str | None
    result: dict | None


class Storage(Protocol):
    """What the server needs from durable storage (SQLite here; PostgreSQL possible)."""

    def get_meta(self, key: str) -> str | None: ...
    def set_meta(self, key: str, value: str) -> None: ...
    def add_token(self, name: str, ttl_s: float) -> str: ...
    def enroll(self, token: str, pubkey: bytes) -> tuple[str, str]: ...
    def client_key(self, client_id: str) -> bytes | None: ...
    def clients(self) -> list[dict]: ...
    def remember_nonce(self, client_id: str, nonce: str, expires_at: float) -> bool: ...
    def open_round(self, round_id: int, session_id: str, stage: str, deadline: float, config: dict) -> None: ...
    def advance_stage(self, round_id: int, stage: str, deadline: float, data: dict,
                      outbox: dict[str, bytes] | None = None, config: dict | None = None) -> None: ...
    def close_round(self, round_id: int, status: str, reason: str, result: dict | None,
                    state_blob: bytes | None) -> None: ...
    def get_round(self, round_id: int) -> RoundRow | None: ...
    def latest_round(self) -> RoundRow | None: ...
    def rounds(self) -> list[RoundRow]: ...
    def transitions(self, round_id: int) -> list[dict]: ...
    def add_submission(self, round_id: int, stage: str, client_id: str, body: bytes) -> bool: ...
    def submissions(self, round_id: int, stage: str) -> dict[str, bytes]: ...
    def put_global_state(self, round_id: int, blob: bytes) -> str: ...
    def global_state(self, round_id: int | None = None) -> tuple[int, bytes] | None: ...
    def put_client_report(self, round_id: int, client_id: str, report: dict) -> None: ...
    def client_reports(self, round_id: int) -> dict[str, dict]: ...


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SQLiteStore:
    """:class:`Storage` on SQLite (WAL, synchronous=FULL, one transaction per state change)."""

    def __init__(self, path: str | Path, clock=time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._db.executescript(SCHEMA)

    # -- plumbing -----------------------------------------------------------------------------
    class _Tx:
        def __init__(self, store: "SQLiteStore") -> None:
            self.s = store

        def __enter__(self) -> sqlite3.Connection:
            self.s._lock.acquire()
            self.s._db.execute("BEGIN IMMEDIATE")
            return self.s._db

        def __exit__(self, et, ev, tb) -> None:
            try:
                self.s._db.execute("COMMIT" if et is None else "ROLLBACK")
            finally:
                self.s._lock.release()

    def _tx(self) -> "_Tx":
        return SQLiteStore._Tx(self)

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def pragma(self, name: str) -> Any:
        """Read a PRAGMA value (tests check WAL and synchronous)."""
        return self._q(f"PRAGMA {name}")[0][0]

    # -- meta ---------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        """Value stored under ``key`` or None."""
        rows = self._q("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key`` durably."""
        with self._tx() as c:
            c.execute("INSERT INTO meta(key,value) VALUES(?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                      (key, value))

    # -- enrolment ----------------------------------------------------------------------------
    def add_token(self, name: str, ttl_s: float = 7 * 86400) -> str:
        """Create a one-time enrolment token for site ``name``; only its hash is stored.

        Returns ``<token_id>.<secret>``, shown once to the operator.
        """
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        now = self._clock()
        with self._tx() as c:
            if c.execute("SELECT 1 FROM enrolments WHERE name=?", (name,)).fetchone():
                raise SecurityError(f"site {name!r} is already enrolled; pick another --name")
            c.execute("INSERT INTO tokens VALUES(?,?,?,?,?,NULL)", (token_id, _sha(secret.encode()), name, now, now + ttl_s))
        return f"{token_id}.{secret}"

    def enroll(self, token: str, pubkey: bytes) -> tuple[str, str]:
        """Spend a one-time ``token`` and record ``pubkey``; returns ``(client_id, name)``.

        Refuses unknown, used, expired or malformed tokens (constant-time secret compare).
        """
        if len(pubkey) != 32:
            raise SecurityError("enrolment public key must be 32 raw Ed25519 bytes")
        token_id, _, secret = token.partition(".")
        now = self._clock()
        with self._tx() as c:
            row = c.execute("SELECT secret_hash,name,expires,used_at FROM tokens WHERE token_id=?", (token_id,)).fetchone()
            ok = row is not None and hmac.compare_digest(row[0], _sha(secret.encode()))
            if not ok:
                raise SecurityError("enrolment token is not valid")
            if row[3] is not None:
                raise SecurityError("enrolment token was already used")
            if now > row[2]:
                raise SecurityError("enrolment token has expired; ask the operator for a new one")
            client_id = "c-" + _sha(pubkey)[:16]
            c.execute("UPDATE tokens SET used_at=? WHERE token_id=?", (now, token_id))
            c.execute("INSERT INTO enrolments VALUES(?,?,?,?, 'active')", (client_id, row[1], pubkey, now))
        return client_id, row[1]

    def client_key(self, client_id: str) -> bytes | None:
        """Raw Ed25519 public key of an active enrolled client, else None."""
        rows = self._q("SELECT pubkey FROM enrolments WHERE client_id=? AND status='active'", (client_id,))
        return bytes(rows[0][0]) if rows else None

    def clients(self) -> list[dict]:
        """Every enrolment, oldest first."""
        rows = self._q("SELECT client_id,name,enrolled_at,status FROM enrolments ORDER BY enrolled_at")
        return [dict(client_id=r[0], name=r[1], enrolled_at=r[2], status=r[3]) for r in rows]

    # -- nonces -------------------------------------------------------------------------------
    def remember_nonce(self, client_id: str, nonce: str, expires_at: float) -> bool:
        """Record a request nonce; False if it was already recorded (a replay)."""
        now = self._clock()
        with self._tx() as c:
            c.execute("DELETE FROM nonces WHERE expires_at < ?", (now - 1,))
            try:
                c.execute("INSERT INTO nonces VALUES(?,?,?)", (client_id, nonce, expires_at))
            except sqlite3.IntegrityError:
                return False
        return True

    # -- rounds -------------------------------------------------------------------------------
    def open_round(self, round_id: int, session_id: str, stage: str, deadline: float, config: dict) -> None:
        """Create round ``round_id`` in its first stage (session ids are unique: never reused)."""
        now = self._clock()
        with self._tx() as c:
            c.execute("INSERT INTO rounds VALUES(?,?,'open',?,?,?,?,NULL,NULL,NULL)",
                      (round_id, session_id, stage, deadline, json.dumps(config), now))
            c.execute("INSERT INTO transitions(round_id,stage,ts,data) VALUES(?,?,?,?)",
                      (round_id, stage, now, json.dumps({"event": "open"})))

    def advance_stage(self, round_id: int, stage: str, deadline: float, data: dict,
                      outbox: dict[str, bytes] | None = None, config: dict | None = None) -> None:
        """Move an open round to ``stage`` with a new deadline, recording ``data`` (e.g. dropped).

        In the same transaction: stores the server's per-client messages for the new stage
        (``outbox``, kept as submissions of stage ``out:<stage>``) and, if given, a new config.
        """
        now = self._clock()
        with self._tx() as c:
            for cid, body in (outbox or {}).items():
                c.execute("INSERT OR REPLACE INTO submissions VALUES(?,?,?,?,?)", (round_id, "out:" + stage, cid, body, now))
            if config is not None:
                c.execute("UPDATE rounds SET config=? WHERE round_id=?", (json.dumps(config), round_id))
            n = c.execute("UPDATE rounds SET stage=?, stage_deadline=? WHERE round_id=? AND status='open'",
                          (stage, deadline, round_id)).rowcount
            if n != 1:
                raise SecurityError(f"round {round_id} is not open")
            c.execute("INSERT INTO transitions(round_id,stage,ts,data) VALUES(?,?,?,?)",
                      (round_id, stage, now, json.dumps(data)))

    def close_round(self, round_id: int, status: str, reason: str, result: dict | None,
                    state_blob: bytes | None) -> None:
        """Close a round as ``done`` (storing the new global state atomically) or ``aborted``."""
        now = self._clock()
        with self._tx() as c:
            c.execute("UPDATE rounds SET status=?, closed_at=?, reason=?, result=?, stage=? WHERE round_id=?",
                      (status, now, reason, json.dumps(result) if result is not None else None, status, round_id))
            c.execute("INSERT INTO transitions(round_id,stage,ts,data) VALUES(?,?,?,?)",
                      (round_id, status, now, json.dumps({"reason": reason})))
            if state_blob is not None:
                c.execute("INSERT OR REPLACE INTO global_state VALUES(?,?,?,?)", (round_id, state_blob, _sha(state_blob), now))

    def _row(self, r: tuple) -> RoundRow:
        return RoundRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7], r[8],
                        json.loads(r[9]) if r[9] else None)

    def get_round(self, round_id: int) -> RoundRow | None:
        """The round or None."""
        rows = self._q("SELECT * FROM rounds WHERE round_id=?", (round_id,))
        return self._row(rows[0]) if rows else None

    def latest_round(self) -> RoundRow | None:
        """The round with the highest id, or None."""
        rows = self._q("SELECT * FROM rounds ORDER BY round_id DESC LIMIT 1")
        return self._row(rows[0]) if rows else None

    def rounds(self) -> list[RoundRow]:
        """All rounds in id order."""
        return [self._row(r) for r in self._q("SELECT * FROM rounds ORDER BY round_id")]

    def transitions(self, round_id: int) -> list[dict]:
        """Stage transitions of a round, in order."""
        rows = self._q("SELECT stage,ts,data FROM transitions WHERE round_id=? ORDER BY id", (round_id,))
        return [dict(stage=r[0], ts=r[1], data=json.loads(r[2])) for r in rows]

    def add_submission(self, round_id: int, stage: str, client_id: str, body: bytes) -> bool:
        """Store an accepted submission; False if already submitted or the round left ``stage``."""
        with self._tx() as c:
            row = c.execute("SELECT stage FROM rounds WHERE round_id=? AND status='open'", (round_id,)).fetchone()
            if row is None or row[0] != stage:
                return False
            try:
                c.execute("INSERT INTO submissions VALUES(?,?,?,?,?)", (round_id, stage, client_id, body, self._clock()))
            except sqlite3.IntegrityError:
                return False
        return True

    def submissions(self, round_id: int, stage: str) -> dict[str, bytes]:
        """Accepted submissions of a stage, by client id."""
        rows = self._q("SELECT client_id, body FROM submissions WHERE round_id=? AND stage=? ORDER BY accepted_at, client_id",
                       (round_id, stage))
        return {r[0]: bytes(r[1]) for r in rows}

    # -- global state -------------------------------------------------------------------------
    def put_global_state(self, round_id: int, blob: bytes) -> str:
        """Store the global LoRA state after ``round_id`` (0 = initial); returns its SHA-256."""
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO global_state VALUES(?,?,?,?)", (round_id, blob, _sha(blob), self._clock()))
        return _sha(blob)

    def global_state(self, round_id: int | None = None) -> tuple[int, bytes] | None:
        """``(round_id, blob)`` of the given or latest global state, or None."""
        if round_id is None:
            rows = self._q("SELECT round_id, blob FROM global_state ORDER BY round_id DESC LIMIT 1")
        else:
            rows = self._q("SELECT round_id, blob FROM global_state WHERE round_id=?", (round_id,))
        return (rows[0][0], bytes(rows[0][1])) if rows else None

    def put_client_report(self, round_id: int, client_id: str, report: dict) -> None:
        """Store what a client reported for a round (ε spent, examples, loss)."""
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO client_reports VALUES(?,?,?)", (round_id, client_id, json.dumps(report)))

    def client_reports(self, round_id: int) -> dict[str, dict]:
        """Client reports of a round, by client id."""
        return {r[0]: json.loads(r[1]) for r in self._q("SELECT client_id, report FROM client_reports WHERE round_id=?", (round_id,))}
