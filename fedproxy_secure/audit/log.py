"""Append-only, hash-chained JSON-lines audit log.

Each line is one JSON object ``{seq, ts, event, data, prev_hash, hash}`` where ``hash`` is the
SHA-256 (hex) of the canonical JSON (sorted keys, no spaces, UTF-8) of the entry *without* its
``hash`` field, and ``prev_hash`` is the previous line's ``hash`` (64 zeros for the first line).
Editing, deleting, inserting or reordering any line breaks the chain at that line, which
:func:`verify_log` reports by line number. Every append is flushed and fsync'ed before it returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedproxy_secure.errors import SecurityError
from fedproxy_secure.protocol.canonical import canonical_json

GENESIS = "0" * 64
_FIELDS = ("seq", "ts", "event", "data", "prev_hash", "hash")


def entry_hash(entry: dict) -> str:
    """SHA-256 hex of the canonical JSON of ``entry`` without its ``hash`` key."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_log`: ``ok``, lines checked, first bad line (1-based) and why."""

    ok: bool
    lines: int
    bad_line: int | None = None
    reason: str = ""
    last_hash: str = GENESIS

    def message(self, path: str | os.PathLike = "") -> str:
        """One human line describing the result."""
        if self.ok:
            return f"{path}: OK, {self.lines} entries, chain head {self.last_hash[:16]}"
        return f"{path}: line {self.bad_line}: {self.reason}"


def verify_log(path: str | os.PathLike, expected_head: str | None = None) -> VerifyResult:
    """Check every line of the log at ``path``; return the first bad line and the reason.

    Detects edits (hash mismatch), deletions and reorderings (``seq`` gap or ``prev_hash``
    mismatch), malformed lines and, when ``expected_head`` is given, truncation of the tail.
    """
    p = Path(path)
    if not p.is_file():
        return VerifyResult(False, 0, 0, f"no such file {p}")
    prev = GENESIS
    n = 0
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            n = lineno
            if not raw.endswith(b"\n"):
                return VerifyResult(False, lineno - 1, lineno, "truncated line (no newline)", prev)
            try:
                entry = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                return VerifyResult(False, lineno - 1, lineno, f"not valid JSON ({exc.__class__.__name__})", prev)
            if not isinstance(entry, dict) or set(entry) != set(_FIELDS):
                return VerifyResult(False, lineno - 1, lineno, f"fields must be exactly {list(_FIELDS)}", prev)
            if entry["seq"] != lineno - 1:
                return VerifyResult(False, lineno - 1, lineno, f"seq {entry['seq']!r}, expected {lineno - 1} (line deleted, inserted or moved)", prev)
            if entry["prev_hash"] != prev:
                return VerifyResult(False, lineno - 1, lineno, "prev_hash does not match the previous line's hash (chain broken)", prev)
            if entry["hash"] != entry_hash(entry):
                return VerifyResult(False, lineno - 1, lineno, "hash does not match the entry's content (line edited)", prev)
            prev = entry["hash"]
    if n == 0:
        return VerifyResult(False, 0, 1, "empty log", prev)
    if expected_head is not None and expected_head != prev:
        return VerifyResult(False, n, n + 1, "chain head differs from the expected head (tail truncated)", prev)
    return VerifyResult(True, n, None, "", prev)


class AuditLog:
    """Appends hash-chained entries to a JSONL file; safe across restarts (resumes the chain).

    Opening an existing log verifies it first and refuses (``SecurityError``) to extend a broken
    chain. A torn last line left by a crash (no trailing newline) is cut off before appending.
    """

    def __init__(self, path: str | os.PathLike, clock=time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq = 0
        self._head = GENESIS
        if self.path.exists() and self.path.stat().st_size > 0:
            self._repair_torn_tail()
            res = verify_log(self.path)
            if not res.ok:
                raise SecurityError(f"audit log {self.path} fails verification: {res.message()}; "
                                    "move it aside and investigate before restarting")
            self._seq = res.lines
            self._head = res.last_hash

    def _repair_torn_tail(self) -> None:
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        with self.path.open("r+b") as fh:
            fh.truncate(cut)
            fh.flush()
            os.fsync(fh.fileno())

    @property
    def head(self) -> str:
        """Hash of the last entry (``GENESIS`` when empty)."""
        return self._head

    def append(self, event: str, data: dict | None = None) -> dict:
        """Append one entry and fsync it; returns the entry written (with its hash)."""
        with self._lock:
            entry = {"seq": self._seq, "ts": round(float(self._clock()), 6), "event": str(event),
                     "data": data or {}, "prev_hash": self._head}
            entry["hash"] = entry_hash(entry)
            line = canonical_json(entry) + b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._seq += 1
            self._head = entry["hash"]
            return entry
