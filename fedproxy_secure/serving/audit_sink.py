"""The serve process's writer of the federation's audit log, and what the log says a site used today.

:class:`AuditSink` opens the log once (which verifies every segment, and refuses a broken chain) and
keeps that writer for the life of the process. Guarantees, from :class:`~fedproxy_secure.auditlog.AuditLog`:
each append costs the same whatever the log's length (it reads no earlier entry, only lines other
commands such as ``server enroll``/``revoke-site`` appended meanwhile, checked against the chain head);
the active file is sealed into a numbered segment at ``segment_bytes``; appends are fsync'ed.
A whole-log check is ``audit verify-log`` (or the next start). Entries hold counts, never text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedproxy_secure.auditlog import AuditLog, log_files

#: the audit event of one request
SERVE_EVENT = "serve_request"


class AuditSink:
    """Appends to the federation's audit log from this process (thread-safe, constant cost per entry)."""

    def __init__(self, path: str | os.PathLike, segment_bytes: int | None = None) -> None:
        self.path = Path(path)
        self._log = AuditLog(self.path, **({"segment_bytes": segment_bytes} if segment_bytes is not None else {}))

    def append(self, event: str, data: dict) -> None:
        """Append one entry (fsync'ed)."""
        self._log.append(event, data)

    @property
    def entries(self) -> int:
        """Entries in the log as of this writer's last append."""
        return self._log.entries


def tokens_used_since(path: str | os.PathLike, since: float, event: str = SERVE_EVENT) -> dict[str, int]:
    """Prompt + completion tokens per site in ``event`` entries with ``ts >= since``.

    Reads the log's files newest first and stops at the first file that begins before ``since``, so
    at start-up only the segments of the current day are read. Call it after the log was verified
    (opening an :class:`AuditSink` does that); it trusts the lines it reads."""
    used: dict[str, int] = {}
    for f in reversed(log_files(path)):
        first_ts = None
        with Path(f).open("rb") as fh:
            for raw in fh:
                try:
                    e = json.loads(raw)
                except ValueError:
                    continue
                if first_ts is None:
                    first_ts = float(e.get("ts", 0.0))
                d = e.get("data") or {}
                if e.get("event") == event and float(e.get("ts", 0.0)) >= since and isinstance(d.get("site"), str):
                    used[d["site"]] = used.get(d["site"], 0) + int(d.get("prompt_tokens") or 0) + \
                        int(d.get("completion_tokens") or 0)
        if first_ts is not None and first_ts < since:
            break
    return used
