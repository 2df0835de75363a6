"""Canonical JSON: the one byte encoding that is hashed, signed and stored.

Encoding (both functions): UTF-8, object keys sorted, separators ``,`` and ``:`` with no
whitespace, non-ASCII characters kept as UTF-8 (``ensure_ascii=False``), NaN and ±Infinity refused.

Float policy (stated once, here):

* :func:`canonical_json` — protocol messages, round configs, audit-log entries — accepts *finite*
  floats and writes them with Python's shortest round-trip ``repr`` (deterministic for a given
  IEEE-754 double). Both parties sign and verify bytes produced by this same function, so a float
  never has to be re-derived from text by another implementation.
* :func:`canonical_dumps` / :func:`canonical_loads` — long-lived signed artifacts (bundle
  manifests, keysets, anti-rollback state) — refuse floats entirely, so those documents have
  exactly one byte representation in any language. ``canonical_loads`` also requires the input
  bytes to *be* the canonical encoding of what they parse to.

The two share one encoder; ``canonical_dumps`` is ``canonical_json`` after a no-float check.
"""

from __future__ import annotations

import json
from typing import Any

from fedproxy_secure.errors import SecurityError

__all__ = ["canonical_json", "canonical_dumps", "canonical_loads"]


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes of ``obj`` (finite floats allowed, see the module's float policy).

    Raises ``ValueError`` on NaN/Infinity and ``TypeError`` on values JSON cannot encode.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _check(obj: Any, where: str) -> None:
    if obj is None or isinstance(obj, (bool, str, int)):
        return
    if isinstance(obj, float):
        raise SecurityError(f"canonical JSON refuses floats (at {where}); use integers or strings")
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise SecurityError(f"canonical JSON needs string keys (at {where}: {k!r})")
            _check(v, f"{where}.{k}")
        return
    raise SecurityError(f"canonical JSON cannot encode {type(obj).__name__} (at {where})")


def canonical_dumps(obj: Any) -> bytes:
    """Strict canonical JSON bytes (no floats); raises ``SecurityError`` on floats or unsupported types."""
    _check(obj, "$")
    return canonical_json(obj)


def _no_float(text: str) -> Any:
    raise SecurityError(f"canonical JSON refuses floats ({text!r})")


def _no_constant(text: str) -> Any:
    raise SecurityError(f"canonical JSON refuses {text}")


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SecurityError(f"canonical JSON refuses duplicate key {k!r}")
        out[k] = v
    return out


def canonical_loads(data: bytes, *, what: str = "document", max_bytes: int = 1 << 20) -> Any:
    """Parse strict canonical JSON bytes; raises ``SecurityError`` unless ``data`` is exactly canonical.

    Guarantees: size <= ``max_bytes``, valid UTF-8, no floats/NaN/duplicate keys, and
    ``canonical_dumps(result) == data``.
    """
    if len(data) > max_bytes:
        raise SecurityError(f"{what} is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, parse_float=_no_float, parse_constant=_no_constant, object_pairs_hook=_no_dupes)
    except SecurityError as exc:
        raise SecurityError(f"{what} is not canonical JSON: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SecurityError(f"{what} is not valid JSON: {exc}") from None
    if canonical_dumps(obj) != data:
        raise SecurityError(f"{what} is not in canonical form (sorted keys, no whitespace, UTF-8)")
    return obj
