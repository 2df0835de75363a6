"""The one threshold rule: how many live clients a secure-aggregation round needs.

Used by the round engine (network), by ``simulate`` (through ``SecAggConfig.threshold_for``) and
by the auditor (``audit check``), so the three always agree.
"""

from __future__ import annotations

import math

__all__ = [
    "effective_threshold",
    "MODE_FLOORS",
    "SA_HTIES_MIN",
    "SPARSE_CUTOFF",
    "SECAGG_PLUS_MARGIN",
    "secagg_plus_degree",
    "neighbourhood_threshold",
]

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


#: cohorts above this size use the SecAgg+ sparse graph by default (complete graph at or below it)
SPARSE_CUTOFF = 64
#: additive security margin of the SecAgg+ degree (see :func:`secagg_plus_degree`)
SECAGG_PLUS_MARGIN = 12


def secagg_plus_degree(n: int, margin: int = SECAGG_PLUS_MARGIN) -> int | None:
    """SecAgg+ neighbour degree k for a cohort of ``n`` clients, or None for the complete graph.

    Guarantees: None when ``n <= SPARSE_CUTOFF`` or when the sparse graph would not be sparser than
    the complete one; otherwise the even degree ``k = 2*ceil(log2 n) + margin`` (< n - 1). Source:
    Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS'20, show
    that a random k-regular (Harary) graph with k = O(log n) neighbours keeps the SecAgg guarantees
    with overwhelming probability; the leading term 2*log2(n) is the issue's choice and the additive
    margin (default 12) is this project's constant, not one derived from the paper's bounds.
    Pure function.
    """
    n = int(n)
    if n <= SPARSE_CUTOFF:
        return None
    k = 2 * math.ceil(math.log2(n)) + int(margin)
    k += k % 2
    return k if k < n - 1 else None


def neighbourhood_threshold(k: int) -> int:
    """Shamir threshold of one client's secrets on a SecAgg+ graph of degree ``k``.

    Guarantees: a strict majority of the ``k + 1`` holders (the k neighbours and the client itself),
    ``(k + 1) // 2 + 1``: fewer than half of a neighbourhood (corrupt or colluding with the server)
    cannot rebuild both secrets of a client, and the round survives as long as a majority of every
    survivor's holders answer. Pure function.
    """
    k = int(k)
    if k < 2:
        raise ValueError(f"secagg.neighbours: {k} must be >= 2")
    return (k + 1) // 2 + 1
