"""Canonical JSON: the one byte encoding that gets signed.

Rules: UTF-8, object keys sorted, no insignificant whitespace, no floats, no NaN/Infinity, no
duplicate keys, only str/int/bool/None/list/dict. ``canonical_loads`` additionally requires that
the input bytes *are* the canonical encoding of what they parse to, so a signed document has
exactly one byte representation (no re-ordering or whitespace games after signing).
"""

from __future__ import annotations

import json
from typing import Any

from fedproxy_secure.errors import SecurityError

__all__ = ["canonical_dumps", "canonical_loads"]


def _check(obj: Any, where: str) -> None:
    if obj is None or isinstance(obj, (bool, str)):
        return
    if isinstance(obj, int):
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
    """Encode ``obj`` as canonical JSON bytes; raises SecurityError on floats or unsupported types."""
    _check(obj, "$")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


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
    """Parse canonical JSON bytes; raises SecurityError unless ``data`` is exactly canonical.

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
