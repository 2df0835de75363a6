"""The one threshold rule: how many live clients a secure-aggregation round needs.

Used by the round engine (network), by ``simulate`` (through ``SecAggConfig.threshold_for``) and
by the auditor (``audit check``), so the three always agree.
"""

from __future__ import annotations

import math

__all__ = ["effective_threshold", "MODE_FLOORS", "SA_HTIES_MIN"]

#: the smallest t each mode accepts, as a function of the cohort size n
MODE_FLOORS = {
    # Bonawitz masking: a strict majority, so a malicious server cannot unmask a single client
    "masking": lambda n: max(n // 2 + 1, 2),
    # HE: a "sum" of one update would be that update, decrypted
    "he": lambda n: 2,
}
#: SA-H-TIES broadcasts the phase-A sum; with K = 2 it reveals the other client's update direction
SA_HTIES_MIN = 3


def effective_threshold(mode: str, n: int, requested: int | None = None, aggregator: str = "fedavg") -> int:
    """The threshold ``t`` a round of ``n`` clients runs with.

    Guarantees: ``t`` is ``requested`` (default ``ceil(2n/3)``, at least 1), raised to the mode's
    floor (masking: strict majority and >= 2; he: >= 2; plain/none: none) and, for aggregator
    ``sa_hties``, to at least 3. Never lowers an explicit request. Pure function.
    """
    n = int(n)
    t = int(requested) if requested is not None else max(1, math.ceil(2 * n / 3))
    floor = MODE_FLOORS.get(mode)
    if floor is not None:
        t = max(t, floor(n))
    if aggregator == "sa_hties":
        t = max(t, SA_HTIES_MIN)
    return t
