"""Stage ii of FedProxy: aggregation rules over flattened client update vectors.

``make_aggregator(name, **params)`` builds one of ``fedavg``, ``fedprox``, ``ties``, ``hties``,
``sa_hties`` behind the :class:`Aggregator` interface (``base.py``). Pure functions: ``fedavg``,
``ties``, ``hties`` and the SA-H-TIES phase functions in ``sa_hties``. The torch helpers
``fedprox.prox_penalty`` and ``pcr.pcr_penalty`` are imported from their modules (not here) so that
this package does not import torch.
"""

from __future__ import annotations

from fedproxy_secure.aggregate.base import AggResult, AggState, Aggregator, SecureSumFn, plain_sum
from fedproxy_secure.aggregate.fedavg import FedAvgAggregator, fedavg
from fedproxy_secure.aggregate.hties import HTiesAggregator, HTiesOutput, HTiesParams, hties
from fedproxy_secure.aggregate.registry import AGGREGATOR_NAMES, make_aggregator
from fedproxy_secure.aggregate.sa_hties import (
    SAHTiesAggregator,
    SAPhaseB,
    sa_client_h,
    sa_h_range,
    sa_phase_a_client,
    sa_phase_b_client,
    sa_server_finish,
)
from fedproxy_secure.aggregate.ties import TiesAggregator, ties
from fedproxy_secure.aggregate.validate import check_updates, flatten_named

__all__ = [
    "AGGREGATOR_NAMES", "AggResult", "AggState", "Aggregator", "FedAvgAggregator", "HTiesAggregator",
    "HTiesOutput", "HTiesParams", "SAHTiesAggregator", "SAPhaseB", "SecureSumFn", "TiesAggregator",
    "check_updates", "fedavg", "flatten_named", "hties", "make_aggregator", "plain_sum", "sa_client_h",
    "sa_h_range", "sa_phase_a_client", "sa_phase_b_client", "sa_server_finish", "ties",
]
