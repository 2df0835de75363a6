"""Which decoder blocks the proxy keeps: top-K by Block Influence, or Offsite-Tuning's uniform drop."""

from __future__ import annotations

import math
from typing import Sequence

from fedproxy_secure.errors import ConfigError


def kept_count(n_layers: int, keep_ratio: float) -> int:
    """``K = L - floor(L * p)`` with ``p = 1 - keep_ratio``; raises ConfigError unless 0 < keep_ratio < 1."""
    if not (isinstance(keep_ratio, (int, float)) and 0.0 < float(keep_ratio) < 1.0):
        raise ConfigError(f"compress.keep_ratio: {keep_ratio!r} must lie strictly between 0 and 1 (e.g. 0.5)")
    if n_layers < 1:
        raise ConfigError(f"compress: the model has {n_layers} decoder blocks; need at least 1")
    p = 1.0 - float(keep_ratio)
    dropped = math.floor(n_layers * p + 1e-9)  # 1e-9 absorbs float error (e.g. 1 - 0.7)
    return max(1, n_layers - dropped)


def select_blocks(scores: Sequence[float], keep_ratio: float) -> list[int]:
    """Indices of the K blocks with the highest score, returned in their original (ascending) order.

    Ties are broken towards the earlier block, so the result is deterministic.
    """
    k = kept_count(len(scores), keep_ratio)
    ranked = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(ranked[:k])


def uniform_blocks(n_layers: int, keep_ratio: float, adapter_blocks: int = 2) -> list[int]:
    """Offsite-Tuning emulator: keep the first and last ``adapter_blocks`` blocks (the trainable adapter)
    and a uniformly spaced subset of the middle, K blocks in all, ascending.

    Middle selection follows Offsite-Tuning's ``uniform_choose_layers``: index ``round(i * stride)``
    with ``stride = (M - 1) / (m - 1)`` over the M middle blocks.
    """
    k = kept_count(n_layers, keep_ratio)
    n = int(adapter_blocks)
    if n < 0 or 2 * n > k:
        raise ConfigError(
            f"compress.ot_adapter_blocks: {n} first + {n} last adapter blocks do not fit in the {k} kept blocks "
            f"of {n_layers}; lower ot_adapter_blocks or raise keep_ratio")
    middle = list(range(n, n_layers - n))
    m = k - 2 * n
    if m == 0:
        chosen: list[int] = []
    elif m == 1:
        chosen = [middle[(len(middle) - 1) // 2]]
    else:
        stride = (len(middle) - 1) / (m - 1)
        chosen = [middle[round(i * stride)] for i in range(m)]
    return sorted(set(range(n)) | set(chosen) | set(range(n_layers - n, n_layers)))
