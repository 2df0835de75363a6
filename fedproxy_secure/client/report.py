"""What a site reports after a round: a minimal report to the server, the full one kept on the site.

The server needs only what it enforces: which round, the site's privacy accounting (ε spent so far,
δ, accountant) and a status. Everything else a trainer measures (training loss on the private
batches, pre/post-clip update norms, example counts, sample rate, timings) is computed outside ε
or describes the site's own update, so it never leaves the site: it is written to
``state_dir/reports/round-NNNNNN.json`` (0600) for the site operator.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedproxy_secure.protocol.client_report import CLIENT_REPORT_KEYS, STATUS_TRAINED, TEXT_MAX

#: the only keys of a report that leave the site: the protocol's client report schema
SENT_REPORT_KEYS = CLIENT_REPORT_KEYS

_REPORTS_DIR = "reports"


def public_report(report: dict | None, round_id: int | None = None, status: str = STATUS_TRAINED) -> dict:
    """The report sent to the server: only :data:`SENT_REPORT_KEYS`, JSON scalars only.

    Guarantees: no other key of ``report`` is copied (no loss, norm, count, rate or timing); ε and δ
    are finite floats or left out; ``accountant`` is a string of at most ``TEXT_MAX`` characters;
    ``round_id`` (argument first, else the report's) is an int; ``status`` is always present. So the
    result passes the server's :func:`~fedproxy_secure.protocol.client_report.check_client_report`
    whenever ε and δ are >= 0 and ``status`` is short enough.
    """
    src = report or {}
    out: dict[str, Any] = {}
    rid = round_id if round_id is not None else src.get("round_id")
    if isinstance(rid, (int, np.integer)) and not isinstance(rid, bool):
        out["round_id"] = int(rid)
    for k in ("epsilon", "delta"):
        v = src.get(k)
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    acc = src.get("accountant")
    if isinstance(acc, str) and acc:
        out["accountant"] = acc[:TEXT_MAX]
    out["status"] = status
    return out


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: numpy scalars unwrapped, NaN/inf as None, small arrays as lists,
    large arrays as a short description, anything else as ``str``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist()) if value.size <= 64 else f"<array shape {list(value.shape)}>"
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def local_report_path(state_dir: str | os.PathLike, round_id: int) -> Path:
    """Where the full report of ``round_id`` is kept on the site."""
    return Path(state_dir) / _REPORTS_DIR / f"round-{int(round_id):06d}.json"


def save_local_report(state_dir: str | os.PathLike, round_id: int, report: dict | None, sent: dict) -> dict:
    """Write the full report of ``round_id`` (and what was sent) into the site's state folder; return it.

    Guarantees: the file is created 0600 in a 0700 folder and replaced atomically (a crash leaves the
    previous version or the new one); the returned dict is what was written (JSON types only).
    """
    path = local_report_path(state_dir, round_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    record = {"round_id": int(round_id), "report": jsonable(report or {}), "sent_to_server": jsonable(sent)}
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh, indent=1)
    os.replace(tmp, path)
    return record


def read_local_reports(state_dir: str | os.PathLike) -> dict[int, dict]:
    """The full reports kept in ``state_dir`` by round id (the site operator's view; empty if none)."""
    out: dict[int, dict] = {}
    for p in sorted((Path(state_dir) / _REPORTS_DIR).glob("round-*.json")):
        rec = json.loads(p.read_text())
        out[int(rec["round_id"])] = rec
    return out
