"""Strict canonical JSON for signed artifacts (no floats); the implementation and its float policy
live in :mod:`fedproxy_secure.wire.canonical`."""

from __future__ import annotations

from fedproxy_secure.wire.canonical import canonical_dumps, canonical_loads

__all__ = ["canonical_dumps", "canonical_loads"]
