"""Anti-rollback state: the highest bundle version this client has accepted.

One small canonical-JSON file per (keyset name, base-model hash) under the client's state folder.
Writes are atomic (temp file + fsync + os.replace). A corrupt or unreadable state file fails
closed (SecurityError): the operator must inspect and delete it deliberately.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

from fedproxy_secure.errors import ConfigError, SecurityError

from .canonical import canonical_dumps, canonical_loads
from .keyset import atomic_write
from .timeutil import format_time

__all__ = ["state_path", "highest_accepted", "check_rollback", "record_accepted"]

_FIELDS = {"keyset_name", "base_model_hash", "highest_version", "bundle_id", "accepted_at"}


def state_path(state_dir: str | Path, keyset_name: str, base_model_hash: str) -> Path:
    """Path of the state file for this (keyset, base model) pair."""
    tag = hashlib.sha256(canonical_dumps([keyset_name, base_model_hash])).hexdigest()[:32]
    return Path(state_dir) / f"rollback-{tag}.json"


def _read(state_dir: str | Path, keyset_name: str, base_model_hash: str) -> dict | None:
    path = state_path(state_dir, keyset_name, base_model_hash)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SecurityError(f"cannot read anti-rollback state {path}: {exc.strerror}") from None
    try:
        doc = canonical_loads(data, what=f"anti-rollback state {path}", max_bytes=4096)
    except SecurityError as exc:
        raise SecurityError(f"{exc}; refusing to continue (inspect and remove the file deliberately)") from None
    if (
        not isinstance(doc, dict)
        or set(doc) != _FIELDS
        or doc["keyset_name"] != keyset_name
        or doc["base_model_hash"] != base_model_hash
        or not isinstance(doc["highest_version"], int)
    ):
        raise SecurityError(f"anti-rollback state {path} is malformed; refusing to continue")
    return doc


def highest_accepted(state_dir: str | Path, keyset_name: str, base_model_hash: str) -> int | None:
    """Highest accepted version, or None if this client never accepted a bundle for the pair."""
    doc = _read(state_dir, keyset_name, base_model_hash)
    return None if doc is None else int(doc["highest_version"])


def check_rollback(state_dir: str | Path, keyset_name: str, base_model_hash: str, version: int, bundle_id: str) -> None:
    """SecurityError if ``version`` is below the highest accepted one, or equal to it with another bundle id."""
    doc = _read(state_dir, keyset_name, base_model_hash)
    if doc is None:
        return
    hi = int(doc["highest_version"])
    if version < hi:
        raise SecurityError(f"bundle version {version} is lower than version {hi} already accepted (rollback refused)")
    if version == hi and doc["bundle_id"] != bundle_id:
        raise SecurityError(
            f"bundle version {version} was already accepted with a different bundle id (rollback/substitution refused)"
        )


def record_accepted(
    state_dir: str | Path, keyset_name: str, base_model_hash: str, version: int, bundle_id: str, now: datetime
) -> None:
    """Atomically raise the stored highest version to ``version`` (never lowers it)."""
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create state folder {state_dir}: {exc.strerror}; pass --state-dir") from None
    check_rollback(state_dir, keyset_name, base_model_hash, version, bundle_id)
    doc = {
        "keyset_name": keyset_name,
        "base_model_hash": base_model_hash,
        "highest_version": version,
        "bundle_id": bundle_id,
        "accepted_at": format_time(now),
    }
    atomic_write(state_path(state_dir, keyset_name, base_model_hash), canonical_dumps(doc), mode=0o600)


