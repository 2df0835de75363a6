"""UTC timestamps in one strict text form: ``YYYY-MM-DDTHH:MM:SSZ``."""

from __future__ import annotations

import re
from datetime import datetime, timezone

from fedproxy_secure.errors import SecurityError

_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC, truncated to whole seconds."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def as_utc(when: datetime | None) -> datetime:
    """``when`` (or now if None) as aware UTC; naive datetimes are refused to avoid local-time bugs."""
    if when is None:
        return utcnow()
    if when.tzinfo is None:
        raise ValueError("datetime must be timezone-aware (UTC)")
    return when.astimezone(timezone.utc)


def format_time(when: datetime) -> str:
    """``when`` as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, whole seconds)."""
    return as_utc(when).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: object, field: str) -> datetime:
    """Parse a strict UTC timestamp; SecurityError naming ``field`` otherwise."""
    if not isinstance(text, str) or not _RE.match(text):
        raise SecurityError(f"{field} must be a UTC timestamp YYYY-MM-DDTHH:MM:SSZ, got {text!r}")
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise SecurityError(f"{field} is not a real date: {text!r}") from None
