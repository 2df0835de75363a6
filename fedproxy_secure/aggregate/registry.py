"""Aggregators by name, as chosen in the run config (``aggregator.name`` + ``aggregator.params``)."""

from __future__ import annotations

from fedproxy_secure.aggregate.base import Aggregator
from fedproxy_secure.errors import ConfigError

AGGREGATOR_NAMES = ("fedavg", "fedprox", "ties", "hties", "sa_hties")
_HTIES_KEYS = ("r0", "delta", "rho", "eps", "h_norm")


def make_aggregator(name: str, **params) -> Aggregator:
    """Build the aggregator ``name`` with its parameters; ``ConfigError`` on unknown names or keys.

    * ``fedavg``: ``secure_sum`` (callable list[vector] -> vector, default plain sum)
    * ``fedprox``: ``mu`` (default 0.01), ``secure_sum``
    * ``ties``: ``density`` (default 0.2)
    * ``hties``: ``r0`` 1.0, ``delta`` 0.2, ``rho`` 1.1, ``eps`` 1e-12
    * ``sa_hties``: the H-TIES keys plus ``h_norm`` ("reveal" | "none") and ``secure_sum``
    """
    from fedproxy_secure.aggregate.fedavg import FedAvgAggregator
    from fedproxy_secure.aggregate.hties import HTiesAggregator, HTiesParams
    from fedproxy_secure.aggregate.sa_hties import SAHTiesAggregator
    from fedproxy_secure.aggregate.ties import TiesAggregator

    allowed = {
        "fedavg": ("secure_sum",),
        "fedprox": ("mu", "secure_sum"),
        "ties": ("density",),
        "hties": _HTIES_KEYS[:4],
        "sa_hties": _HTIES_KEYS + ("secure_sum",),
    }
    if name not in allowed:
        raise ConfigError(f"aggregator.name = {name!r} is unknown; use one of {', '.join(AGGREGATOR_NAMES)}")
    unknown = sorted(set(params) - set(allowed[name]))
    if unknown:
        raise ConfigError(f"aggregator.params: {unknown} not accepted by {name!r}; allowed: {list(allowed[name])}")
    if name == "fedavg":
        return FedAvgAggregator(**params)
    if name == "fedprox":
        from fedproxy_secure.aggregate.fedprox import FedProxAggregator

        return FedProxAggregator(**params)
    if name == "ties":
        return TiesAggregator(**params)
    hp = HTiesParams(**{k: params[k] for k in _HTIES_KEYS if k in params})
    if name == "hties":
        return HTiesAggregator(params=hp)
    extra = {"secure_sum": params["secure_sum"]} if "secure_sum" in params else {}
    return SAHTiesAggregator(params=hp, **extra)
