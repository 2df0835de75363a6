"""L2 clipping of a client's update before it leaves the trainer (secure aggregation needs a bound)."""

from __future__ import annotations

import numpy as np


def clip_l2(u: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """Return ``(u scaled to L2 norm <= bound, norm of u before clipping)``; float64, never longer than ``bound``."""
    if not bound > 0:
        raise ValueError(f"train.update_clip_norm = {bound!r}: must be > 0")
    u = np.asarray(u, dtype=np.float64)
    n = float(np.linalg.norm(u))
    if n > bound:
        u = u * (bound / n)
        n2 = float(np.linalg.norm(u))
        if n2 > bound:  # float rounding
            u = u * (bound / n2) * (1 - 1e-12)
    return u, n
