"""The one interface every secure-aggregation mode offers the aggregator.

The aggregator asks for *the sum of these clients' vectors, from at least t survivors* and never
learns which mode produced it. Modes: ``plain`` (no protection, for baselines), ``masking``
(SecAgg pairwise masks with dropout recovery) and ``he`` (CKKS via TenSEAL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol

import numpy as np

from fedproxy_secure.errors import ProtocolAbort

# Stages at which a client may drop in a dropout plan (in protocol order).
STAGES = ("advertise", "share", "masked_input", "consistency", "unmask")


@dataclass(frozen=True)
class DropoutPlan:
    """Which clients go silent *before* each protocol stage (simulation and tests only).

    ``before[stage]`` is a set of client ids that send nothing from that stage on.
    """

    before: Mapping[str, frozenset[int]] = field(default_factory=dict)

    def dropped_by(self, stage: str) -> frozenset[int]:
        """Every client that has dropped at or before ``stage``."""
        out: set[int] = set()
        for s in STAGES[: STAGES.index(stage) + 1]:
            out |= set(self.before.get(s, ()))
        return frozenset(out)


@dataclass(frozen=True)
class SecureSumResult:
    """The decoded sum of the survivors' vectors, and what it cost."""

    total: np.ndarray  # float64, shape (P,)
    survivors: tuple[int, ...]
    mode: str
    stats: dict = field(default_factory=dict)  # bytes_per_client, seconds, etc. (JSON-able)


class SecureSummer(Protocol):
    """Computes ``sum_{i in survivors} x_i`` without showing the server any single ``x_i``."""

    mode: str

    def secure_sum(
        self,
        vectors: Mapping[int, np.ndarray],
        *,
        threshold: int,
        session_id: bytes,
        dropouts: DropoutPlan | None = None,
    ) -> SecureSumResult:
        """Return the sum over survivors; raise ``ProtocolAbort`` if fewer than ``threshold`` survive."""
        ...


class PlainSummer:
    """No protection: the server sees every vector. For baselines and as the reference in tests."""

    mode = "plain"

    def secure_sum(
        self,
        vectors: Mapping[int, np.ndarray],
        *,
        threshold: int,
        session_id: bytes,
        dropouts: DropoutPlan | None = None,
    ) -> SecureSumResult:
        """Sum the vectors of clients not dropped before ``masked_input``."""
        dropped = dropouts.dropped_by("masked_input") if dropouts else frozenset()
        survivors = tuple(sorted(i for i in vectors if i not in dropped))
        if len(survivors) < threshold:
            raise ProtocolAbort(
                f"only {len(survivors)} clients survived, threshold is {threshold}: round aborted"
            )
        total = np.zeros_like(np.asarray(next(iter(vectors.values())), dtype=np.float64))
        for i in survivors:
            total += np.asarray(vectors[i], dtype=np.float64)
        nbytes = int(total.size * 4)
        return SecureSumResult(total, survivors, self.mode, {"bytes_per_client": nbytes})
