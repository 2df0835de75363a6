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

from fedproxy_secure.errors import ProtocolAbort, SecurityError
from fedproxy_secure.protocol.client_report import CLIENT_REPORT_KEYS, check_client_report  # noqa: F401  (the one schema)
from fedproxy_secure.server.uploads import UploadLimits, UploadRow, chunk_length

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
CREATE TABLE IF NOT EXISTS optimizer_state (round_id INTEGER PRIMARY KEY, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS client_reports (round_id INTEGER NOT NULL, client_id TEXT NOT NULL,
  report TEXT NOT NULL, PRIMARY KEY (round_id, client_id));
CREATE TABLE IF NOT EXISTS uploads (round_id INTEGER NOT NULL, stage TEXT NOT NULL, client_id TEXT NOT NULL,
  size INTEGER NOT NULL, sha256 TEXT NOT NULL, chunk_size INTEGER NOT NULL, status TEXT NOT NULL,
  created REAL NOT NULL, PRIMARY KEY (round_id, stage, client_id));
CREATE TABLE IF NOT EXISTS upload_chunks (round_id INTEGER NOT NULL, stage TEXT NOT NULL,
  client_id TEXT NOT NULL, idx INTEGER NOT NULL, body BLOB NOT NULL, sha256 TEXT NOT NULL,
  PRIMARY KEY (round_id, stage, client_id, idx));
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
                      outbox: dict[str, bytes] | None = None, config: dict | None = None) -> list[dict]: ...
    def close_round(self, round_id: int, status: str, reason: str, result: dict | None,
                    state_blob: bytes | None, optimizer_blob: bytes | None = None) -> list[dict]: ...
    def optimizer_state(self) -> tuple[int, bytes] | None: ...
    def get_round(self, round_id: int) -> RoundRow | None: ...
    def latest_round(self) -> RoundRow | None: ...
    def rounds(self) -> list[RoundRow]: ...
    def transitions(self, round_id: int) -> list[dict]: ...
    def add_submission(self, round_id: int, stage: str, client_id: str, body: bytes,
                       raw_sha256: str | None = None) -> bool: ...
    def submissions(self, round_id: int, stage: str) -> dict[str, bytes]: ...
    def put_global_state(self, round_id: int, blob: bytes) -> str: ...
    def global_state(self, round_id: int | None = None) -> tuple[int, bytes] | None: ...
    def put_client_report(self, round_id: int, client_id: str, report: dict) -> None: ...
    def client_reports(self, round_id: int) -> dict[str, dict]: ...
    def open_upload(self, round_id: int, stage: str, client_id: str, size: int, sha256: str,
                    limits: UploadLimits) -> tuple[UploadRow, bool]: ...
    def get_upload(self, round_id: int, stage: str, client_id: str) -> UploadRow | None: ...
    def put_chunk(self, round_id: int, stage: str, client_id: str, index: int, body: bytes) -> bool: ...
    def upload_bytes(self, round_id: int, stage: str, client_id: str) -> tuple[UploadRow, bytes]: ...
    def discard_upload(self, round_id: int, stage: str, client_id: str) -> bool: ...
    def settle_upload(self, round_id: int, stage: str,
                      client_id: str) -> tuple[str, str, UploadRow] | None: ...


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

    def token_site(self, token: str, allow_used: bool = False) -> str:
        """The site name ``token`` is bound to, without spending it; SecurityError if it is unknown, used (unless
        ``allow_used``) or expired (same checks and constant-time compare as :meth:`enroll`, which still decides
        atomically)."""
        token_id, _, secret = token.partition(".")
        rows = self._q("SELECT secret_hash,name,expires,used_at FROM tokens WHERE token_id=?", (token_id,))
        if not rows or not hmac.compare_digest(rows[0][0], _sha(secret.encode())):
            raise SecurityError("enrolment token is not valid")
        if rows[0][3] is not None:
            if allow_used:
                return rows[0][1]
            raise SecurityError("enrolment token was already used")
        if self._clock() > rows[0][2]:
            raise SecurityError("enrolment token has expired; ask the operator for a new one")
        return rows[0][1]

    def revoke_client(self, name: str) -> str | None:
        """Mark site ``name``'s enrolment revoked (its key is no longer returned by :meth:`client_key`) and
        spend its unused tokens; returns its client id, or None if it never enrolled."""
        with self._tx() as c:
            row = c.execute("SELECT client_id FROM enrolments WHERE name=?", (name,)).fetchone()
            c.execute("UPDATE enrolments SET status='revoked' WHERE name=?", (name,))
            c.execute("UPDATE tokens SET used_at=? WHERE name=? AND used_at IS NULL", (self._clock(), name))
        return row[0] if row else None

    def open_rounds_with(self, client_id: str) -> list[tuple[int, str]]:
        """``(round_id, stage)`` of every open round whose cohort holds ``client_id``, or whose join stage
        already holds its check-in (it would be put into the cohort)."""
        with self._lock:
            return _open_rounds_with(self._db, client_id)

    def forget_client(self, name: str, client_id: str | None, dry_run: bool = False) -> dict[str, int]:
        """Delete, in one transaction, every row the store keeps about site ``name`` / ``client_id`` that is
        not needed for integrity; returns the number of rows by kind (what would go when ``dry_run``).

        Deleted: its enrolment row (name, identity key, time), its token rows, its protocol messages and the
        server's messages to it (``submissions``), its uploads and their chunks, its client reports and its
        request nonces. Kept: the signed round configs and stage transitions (pseudonymous client ids; the
        configs are signed, other sites hold them as evidence) and the global states (aggregates only).
        Unless ``dry_run``, raises LookupError naming the round when the client is in an open round
        (:meth:`open_rounds_with`), checked inside the same transaction, so nothing is deleted then.
        """
        cid = client_id or ""
        queries = {
            "enrolments": ("enrolments", "name=? OR client_id=?", (name, cid)),
            "tokens": ("tokens", "name=?", (name,)),
            "submissions": ("submissions", "client_id=? AND stage NOT LIKE 'out:%'", (cid,)),
            "server_messages": ("submissions", "client_id=? AND stage LIKE 'out:%'", (cid,)),
            "upload_chunks": ("upload_chunks", "client_id=?", (cid,)),
            "uploads": ("uploads", "client_id=?", (cid,)),
            "client_reports": ("client_reports", "client_id=?", (cid,)),
            "nonces": ("nonces", "client_id=?", (cid,)),
        }
        with self._tx() as c:
            if not dry_run and cid and (busy := _open_rounds_with(c, cid)):
                rid, stage = busy[0]
                raise LookupError(f"client {cid} is in the cohort of open round {rid} (stage {stage!r})")
            counts = {k: int(c.execute(f"SELECT COUNT(*) FROM {t} WHERE {w}", a).fetchone()[0])
                      for k, (t, w, a) in queries.items()}
            if not dry_run:
                for t, w, a in queries.values():
                    c.execute(f"DELETE FROM {t} WHERE {w}", a)
        return counts

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
                      outbox: dict[str, bytes] | None = None, config: dict | None = None) -> list[dict]:
        """Move an open round to ``stage`` with a new deadline, recording ``data`` (e.g. dropped).

        In the same transaction: stores the server's per-client messages for the new stage
        (``outbox``, kept as submissions of stage ``out:<stage>``) and, if given, a new config, and
        discards the uncommitted uploads of the round's other stages. Returns those discarded.
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
            return _discard_uploads(c, "round_id=? AND stage<>? AND status='open'", (round_id, stage))

    def close_round(self, round_id: int, status: str, reason: str, result: dict | None,
                    state_blob: bytes | None, optimizer_blob: bytes | None = None) -> list[dict]:
        """Close a round as ``done`` (storing the new global state, and the server optimizer's state
        when given, atomically) or ``aborted``.

        The round's uncommitted uploads are discarded in the same transaction and returned
        (a committed upload keeps its row, without chunks, so a repeated commit is answered).
        """
        now = self._clock()
        with self._tx() as c:
            c.execute("UPDATE rounds SET status=?, closed_at=?, reason=?, result=?, stage=? WHERE round_id=?",
                      (status, now, reason, json.dumps(result) if result is not None else None, status, round_id))
            c.execute("INSERT INTO transitions(round_id,stage,ts,data) VALUES(?,?,?,?)",
                      (round_id, status, now, json.dumps({"reason": reason})))
            if state_blob is not None:
                c.execute("INSERT OR REPLACE INTO global_state VALUES(?,?,?,?)", (round_id, state_blob, _sha(state_blob), now))
            if optimizer_blob is not None:
                c.execute("INSERT OR REPLACE INTO optimizer_state VALUES(?,?)", (round_id, optimizer_blob))
                c.execute("DELETE FROM optimizer_state WHERE round_id<?", (round_id,))  # only the latest is ever read
            return _discard_uploads(c, "round_id=? AND status='open'", (round_id,))

    def optimizer_state(self) -> tuple[int, bytes] | None:
        """``(round_id, blob)`` of the server optimizer's state stored with the latest done round, if any."""
        rows = self._q("SELECT round_id, blob FROM optimizer_state ORDER BY round_id DESC LIMIT 1")
        return (rows[0][0], bytes(rows[0][1])) if rows else None

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

    def add_submission(self, round_id: int, stage: str, client_id: str, body: bytes,
                       raw_sha256: str | None = None) -> bool:
        """Store an accepted submission; False if already submitted or the round left ``stage``.

        In the same transaction the client's upload for this stage, if any, becomes ``committed``
        (its chunks are dropped) only if it declared this message: its SHA-256 equals that of
        ``body`` (the stored canonical form) or ``raw_sha256`` (the bytes as received). Then closing
        the stage will not discard it. An upload of another message stays open, and its commit is
        refused (:meth:`settle_upload`).
        """
        with self._tx() as c:
            row = c.execute("SELECT stage FROM rounds WHERE round_id=? AND status='open'", (round_id,)).fetchone()
            if row is None or row[0] != stage:
                return False
            try:
                c.execute("INSERT INTO submissions VALUES(?,?,?,?,?)", (round_id, stage, client_id, body, self._clock()))
            except sqlite3.IntegrityError:
                return False
            up = self._upload(c, round_id, stage, client_id)
            if up is not None and any(h is not None and hmac.compare_digest(up.sha256, h)
                                      for h in (_sha(body), raw_sha256)):
                self._mark_committed(c, round_id, stage, client_id)
        return True

    @staticmethod
    def _mark_committed(c: sqlite3.Connection, round_id: int, stage: str, client_id: str) -> None:
        key = (round_id, stage, client_id)
        c.execute("UPDATE uploads SET status='committed' WHERE round_id=? AND stage=? AND client_id=?", key)
        c.execute("DELETE FROM upload_chunks WHERE round_id=? AND stage=? AND client_id=?", key)

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
        """Store what a client reported for a round: only a minimal report (:func:`check_client_report`;
        ProtocolAbort naming the field otherwise), so no training statistic is ever written."""
        check_client_report(report, round_id)
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO client_reports VALUES(?,?,?)", (round_id, client_id, json.dumps(report)))

    def client_reports(self, round_id: int) -> dict[str, dict]:
        """Client reports of a round, by client id."""
        return {r[0]: json.loads(r[1]) for r in self._q("SELECT client_id, report FROM client_reports WHERE round_id=?", (round_id,))}

    # -- chunked uploads (see server/uploads.py) ------------------------------------------------
    def _open_stage(self, c: sqlite3.Connection, round_id: int, stage: str) -> None:
        row = c.execute("SELECT status, stage FROM rounds WHERE round_id=?", (round_id,)).fetchone()
        if row is None or row[0] != "open":
            raise LookupError(f"round {round_id} is not open; any upload for it was discarded")
        if row[1] != stage:
            raise LookupError(f"round {round_id} is at stage {row[1]!r}, not {stage!r}; "
                              "an upload for a closed stage is discarded")

    def _upload(self, c: sqlite3.Connection, round_id: int, stage: str, client_id: str) -> UploadRow | None:
        r = c.execute("SELECT size, sha256, chunk_size, status FROM uploads WHERE round_id=? AND stage=? AND "
                      "client_id=?", (round_id, stage, client_id)).fetchone()
        if r is None:
            return None
        have = tuple(i for (i,) in c.execute("SELECT idx FROM upload_chunks WHERE round_id=? AND stage=? AND "
                                             "client_id=? ORDER BY idx", (round_id, stage, client_id)))
        return UploadRow(round_id, stage, client_id, r[0], r[1], r[2], r[3], have)

    def open_upload(self, round_id: int, stage: str, client_id: str, size: int, sha256: str,
                    limits: UploadLimits) -> tuple[UploadRow, bool]:
        """Declare (or resume) the upload of ``client_id``'s message for ``(round_id, stage)``.

        Returns ``(upload, created)``. The same size and hash resume the existing upload (open or
        committed); anything else is refused: another hash (``LookupError``), a stage that is not
        the round's current one (``LookupError``), a message already accepted (``LookupError``),
        more than ``limits.max_open`` open uploads or ``limits.max_bytes`` declared bytes for the
        client (``PermissionError``).
        """
        with self._tx() as c:
            prev = self._upload(c, round_id, stage, client_id)
            if prev is not None:
                if prev.size != size or not hmac.compare_digest(prev.sha256, sha256):
                    raise LookupError(f"an upload of another message (size {prev.size}, sha256 {prev.sha256[:16]}...) "
                                      f"is already declared for round {round_id} stage {stage}")
                return prev, False
            self._open_stage(c, round_id, stage)
            if c.execute("SELECT 1 FROM submissions WHERE round_id=? AND stage=? AND client_id=?",
                         (round_id, stage, client_id)).fetchone():
                raise LookupError(f"a message was already accepted for round {round_id} stage {stage}")
            n_open, held = c.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM uploads WHERE client_id=? AND "
                                     "status='open'", (client_id,)).fetchone()
            if n_open >= limits.max_open:
                raise PermissionError(f"client {client_id} already has {n_open} open upload(s), the limit is "
                                      f"{limits.max_open}")
            if held + size > limits.max_bytes:
                raise PermissionError(f"upload of {size} bytes would give client {client_id} {held + size} declared "
                                      f"bytes in open uploads, the limit is {limits.max_bytes}")
            c.execute("INSERT INTO uploads VALUES(?,?,?,?,?,?, 'open', ?)",
                      (round_id, stage, client_id, size, sha256, limits.chunk_bytes, self._clock()))
            return UploadRow(round_id, stage, client_id, size, sha256, limits.chunk_bytes, "open"), True

    def get_upload(self, round_id: int, stage: str, client_id: str) -> UploadRow | None:
        """The upload with the chunk indices held, or None."""
        with self._lock:
            return self._upload(self._db, round_id, stage, client_id)

    def put_chunk(self, round_id: int, stage: str, client_id: str, index: int, body: bytes) -> bool:
        """Store chunk ``index`` durably; True if this exact chunk was already held (idempotent resend).

        Refuses a chunk for a stage that is not current or an upload not open (``LookupError``),
        a different body for a held index (``LookupError``), a wrong length or index (``ProtocolAbort``).
        """
        with self._tx() as c:
            self._open_stage(c, round_id, stage)
            up = self._upload(c, round_id, stage, client_id)
            if up is None:
                raise LookupError(f"no upload is declared for round {round_id} stage {stage}; declare it first")
            if up.status != "open":
                raise LookupError(f"the upload for round {round_id} stage {stage} is already committed")
            want = chunk_length(up.size, up.chunk_size, index)
            if len(body) != want:
                raise ProtocolAbort(f"chunk {index} has {len(body)} bytes, it must have {want}")
            digest = _sha(body)
            old = c.execute("SELECT sha256 FROM upload_chunks WHERE round_id=? AND stage=? AND client_id=? AND idx=?",
                            (round_id, stage, client_id, index)).fetchone()
            if old is not None:
                if not hmac.compare_digest(old[0], digest):
                    raise LookupError(f"chunk {index} is already held with different content (conflicting resend)")
                return True
            c.execute("INSERT INTO upload_chunks VALUES(?,?,?,?,?,?)", (round_id, stage, client_id, index, body, digest))
            return False

    def upload_bytes(self, round_id: int, stage: str, client_id: str) -> tuple[UploadRow, bytes]:
        """The upload and its chunks joined in order; ``LookupError`` if it is missing or incomplete."""
        with self._lock:
            up = self._upload(self._db, round_id, stage, client_id)
            if up is None:
                raise LookupError(f"no upload is declared for round {round_id} stage {stage}")
            if up.status != "open":
                return up, b""
            missing = up.missing()
            if missing:
                raise LookupError(f"upload incomplete: {len(missing)} of {up.chunks} chunks missing "
                                  f"(first {missing[:8]})")
            rows = self._db.execute("SELECT body FROM upload_chunks WHERE round_id=? AND stage=? AND client_id=? "
                                    "ORDER BY idx", (round_id, stage, client_id)).fetchall()
            return up, b"".join(bytes(r[0]) for r in rows)

    def settle_upload(self, round_id: int, stage: str, client_id: str) -> tuple[str, str, UploadRow] | None:
        """For a client that already has an accepted message for ``(round_id, stage)`` (e.g. by a
        single-body POST after declaring an upload): ``("same", sha, upload)`` if that stored message
        has the upload's declared SHA-256 (the upload becomes ``committed``), ``("different", sha,
        upload)`` if not (nothing changes; the caller refuses the commit); ``sha`` is the stored
        message's SHA-256. None if no message is stored or there is no open upload.
        """
        with self._tx() as c:
            up = self._upload(c, round_id, stage, client_id)
            row = c.execute("SELECT body FROM submissions WHERE round_id=? AND stage=? AND client_id=?",
                            (round_id, stage, client_id)).fetchone()
            if up is None or up.status != "open" or row is None:
                return None
            sha = _sha(bytes(row[0]))
            if hmac.compare_digest(sha, up.sha256):
                self._mark_committed(c, round_id, stage, client_id)
                return "same", sha, up
            return "different", sha, up

    def discard_upload(self, round_id: int, stage: str, client_id: str) -> bool:
        """Drop an open upload and its chunks (its message was refused); False if none was open."""
        with self._tx() as c:
            return bool(_discard_uploads(c, "round_id=? AND stage=? AND client_id=? AND status='open'",
                                         (round_id, stage, client_id)))


def _open_rounds_with(c: sqlite3.Connection, client_id: str) -> list[tuple[int, str]]:
    """Open rounds that hold ``client_id`` in their cohort or, at the join stage, its check-in."""
    out = []
    for rid, stage, cfg in c.execute("SELECT round_id, stage, config FROM rounds WHERE status='open' "
                                     "ORDER BY round_id").fetchall():
        cohort = {str(m[0]) for m in (json.loads(cfg).get("cohort") or [])}
        joined = c.execute("SELECT 1 FROM submissions WHERE round_id=? AND stage='join' AND client_id=?",
                           (rid, client_id)).fetchone() is not None
        if client_id in cohort or (stage == "join" and joined):
            out.append((int(rid), str(stage)))
    return out


def _discard_uploads(c: sqlite3.Connection, where: str, args: tuple) -> list[dict]:
    """Delete the uploads matching ``where`` and their chunks (inside the caller's transaction)."""
    rows = c.execute(f"SELECT round_id, stage, client_id, size FROM uploads WHERE {where}", args).fetchall()
    for rid, stage, cid, _ in rows:
        c.execute("DELETE FROM upload_chunks WHERE round_id=? AND stage=? AND client_id=?", (rid, stage, cid))
        c.execute("DELETE FROM uploads WHERE round_id=? AND stage=? AND client_id=?", (rid, stage, cid))
    return [{"round": r[0], "stage": r[1], "client": r[2], "size": r[3]} for r in rows]
