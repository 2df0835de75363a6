"""The aggregator interface shared by every aggregation rule (FedAvg, FedProx, TIES, H-TIES, SA-H-TIES).

The round driver (simulation or network server) calls ``Aggregator.aggregate`` with the clients'
flattened update vectors (numpy float64, shape ``(P,)``), their example counts and an
:class:`AggState` carried across rounds, and gets an :class:`AggResult` back: the global step
``delta`` (``theta_g <- theta_g + delta``), the conflict vector ``C`` for the clients' proximal
conflict regulariser (PCR), or ``None`` for rules without one, and a JSON-able ``info`` dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from fedproxy_secure.errors import ConfigError

#: A secure sum as the aggregator sees it: list of per-client vectors -> their elementwise sum.
#: Plain numpy sum, the masking summer or the HE summer all fit (see ``secagg.base``).
SecureSumFn = Callable[[list[np.ndarray]], np.ndarray]


def plain_sum(vectors: list[np.ndarray]) -> np.ndarray:
    """Elementwise float64 sum of equal-length vectors (no protection; the reference secure sum)."""
    out = np.zeros_like(np.asarray(vectors[0], dtype=np.float64))
    for v in vectors:
        out += np.asarray(v, dtype=np.float64)
    return out


@dataclass
class AggState:
    """What an aggregator may carry from one round to the next.

    ``round`` is the index of the round being aggregated; ``conflict`` is the previous round's
    conflict vector (``None`` before the first H-TIES round, which clients treat as zeros).
    """

    round: int = 0
    conflict: np.ndarray | None = None


@dataclass
class AggResult:
    """Outcome of one aggregation.

    ``delta``: float64 ``(P,)`` global step. ``conflict``: float64 ``(P,)`` in ``[0, 1]`` for PCR, or
    ``None``. ``info``: JSON-able dict (plain Python floats/ints/lists/strings only).
    """

    delta: np.ndarray
    conflict: np.ndarray | None = None
    info: dict = field(default_factory=dict)


@runtime_checkable
class Aggregator(Protocol):
    """One aggregation rule, chosen by name in the run config (see ``registry.make_aggregator``).

    ``needs_individual_updates`` is ``True`` when the rule needs each client's update in the clear
    (TIES, plaintext H-TIES) and therefore cannot run under secure aggregation.
    """

    name: str
    needs_individual_updates: bool

    def aggregate(
        self, updates: Sequence[np.ndarray], num_examples: Sequence[int], state: AggState
    ) -> AggResult:
        """Combine the clients' updates into one global step; never mutates its inputs."""
        ...


def require(cond: bool, field_name: str, value, fix: str) -> None:
    """Raise ``ConfigError`` naming ``field_name``, its ``value`` and ``fix`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"aggregator.{field_name} = {value!r} is invalid: {fix}")


def jsonable_floats(x) -> list[float]:
    """A plain ``list[float]`` copy of a 1-D array (for ``AggResult.info``)."""
    return [float(v) for v in np.asarray(x, dtype=np.float64).ravel()]
