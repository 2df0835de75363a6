"""Input checks shared by every aggregator: one clear ``DataError`` per malformed input.

Every check names the offending client (by index, and by name when names are given) and the problem.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from fedproxy_secure.errors import DataError


def _label(i: int, names: Sequence[str] | None) -> str:
    return f"client {i} ({names[i]!r})" if names is not None else f"client {i}"


def as_vector(x) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor or sequence) as a new float64 numpy array.

    Torch tensors are detached and moved to CPU; torch is never imported here.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().to(dtype=__import__("torch").float64).numpy()
    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        raise DataError("update is complex-valued; updates must be real float vectors")
    return np.array(arr, dtype=np.float64, copy=True)


def check_updates(
    updates: Sequence[np.ndarray], names: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Validate client updates and return them as float64 1-D copies.

    Guarantees on return: at least one update; every update 1-D, same length ``P >= 1``, all finite.
    Raises ``DataError`` naming the client index (and name) for: empty list, non-1-D, empty vector,
    length mismatch, NaN/Inf (with count and first position), complex dtype; and for ``names`` whose
    length differs from the number of updates or that repeat a name.
    Zero vectors are valid (each aggregator documents what it does with them).
    """
    if updates is None or len(updates) == 0:
        raise DataError("no client updates to aggregate: the list of updates is empty")
    if names is not None:
        names = list(names)
        if len(names) != len(updates):
            raise DataError(
                f"got {len(updates)} updates but {len(names)} client names; pass one name per update"
            )
        seen: dict[str, int] = {}
        for i, n in enumerate(names):
            if n in seen:
                raise DataError(f"client name {n!r} is used by clients {seen[n]} and {i}; names must be unique")
            seen[n] = i
    out: list[np.ndarray] = []
    length: int | None = None
    for i, u in enumerate(updates):
        try:
            v = as_vector(u)
        except DataError as exc:
            raise DataError(f"{_label(i, names)}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise DataError(f"{_label(i, names)}: update is not a numeric vector ({exc})") from None
        if v.ndim != 1:
            raise DataError(
                f"{_label(i, names)}: update has shape {v.shape}; flatten it to one 1-D vector"
            )
        if v.size == 0:
            raise DataError(f"{_label(i, names)}: update is an empty vector")
        if length is None:
            length = v.size
        elif v.size != length:
            raise DataError(
                f"{_label(i, names)}: update has length {v.size} but client 0 has length {length}; "
                "all clients must flatten the same parameters in the same order"
            )
        bad = ~np.isfinite(v)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{_label(i, names)}: update has {int(bad.sum())} non-finite value(s) (NaN/Inf), "
                f"first at coordinate {first}; reject this client's update"
            )
        out.append(v)
    return out


def check_num_examples(num_examples: Sequence[int], k: int, *, need_positive_total: bool) -> np.ndarray:
    """Validate example counts: ``k`` non-negative finite integers (positive total if required).

    Returns them as float64. Raises ``DataError`` naming the client at fault.
    """
    if num_examples is None or len(num_examples) != k:
        got = None if num_examples is None else len(num_examples)
        raise DataError(f"got {k} updates but {got} example counts; pass one count per update")
    n = np.asarray(num_examples, dtype=np.float64)
    for i, v in enumerate(n):
        if not np.isfinite(v) or v < 0 or v != np.floor(v):
            raise DataError(f"client {i}: num_examples = {num_examples[i]!r}; must be a non-negative integer")
    if need_positive_total and n.sum() <= 0:
        raise DataError("every client reports num_examples = 0; at least one example is needed to weight updates")
    return n


def flatten_named(
    named_updates: Sequence[Mapping[str, np.ndarray]], names: Sequence[str] | None = None
) -> tuple[list[np.ndarray], list[tuple[str, tuple[int, ...]]]]:
    """Flatten per-parameter updates (``{param_name: array}`` per client) into validated vectors.

    Parameters are concatenated in sorted name order. Returns ``(vectors, layout)`` where ``layout``
    lists ``(param_name, shape)``. Raises ``DataError`` naming the client and the missing / extra
    parameter names or the mismatched shape, and everything ``check_updates`` raises.
    """
    if not named_updates:
        raise DataError("no client updates to aggregate: the list of updates is empty")
    ref = named_updates[0]
    keys = sorted(ref)
    if not keys:
        raise DataError(f"{_label(0, names)}: update has no parameters")
    layout = [(k, tuple(np.shape(as_vector(ref[k])))) for k in keys]
    vectors = []
    for i, upd in enumerate(named_updates):
        missing = sorted(set(keys) - set(upd))
        extra = sorted(set(upd) - set(keys))
        if missing or extra:
            raise DataError(
                f"{_label(i, names)}: parameter names differ from client 0 "
                f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"extra {extra[:5]}{'...' if len(extra) > 5 else ''})"
            )
        parts = []
        for k, shape in layout:
            a = as_vector(upd[k])
            if a.shape != shape:
                raise DataError(f"{_label(i, names)}: parameter {k!r} has shape {a.shape}, client 0 has {shape}")
            parts.append(a.ravel())
        vectors.append(np.concatenate(parts))
    return check_updates(vectors, names), layout
