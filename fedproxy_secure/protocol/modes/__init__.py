"""The mode registry: secure-aggregation modes by name, and composites (aggregators) over them.

``resolve(mode, aggregator)`` gives the :class:`~fedproxy_secure.protocol.modes.base.Mode` a round
runs: the base mode itself for FedAvg (its :meth:`Mode.finish` is FedAvg over the secure sum), or a
composite built over the base mode (``sa_hties``: two secure sums per round). A new mode is one file
under this package plus one :func:`register_mode` call (below, or in a test).
"""

from __future__ import annotations

from typing import Callable

from fedproxy_secure.errors import ConfigError
from fedproxy_secure.protocol.modes.base import ClientStages, Finish, Mode, RoundContext, ServerStages

__all__ = ["Mode", "ServerStages", "ClientStages", "RoundContext", "Finish", "register_mode", "register_composite",
           "unregister", "resolve", "mode_names", "aggregator_names", "make_client_stages"]

_MODES: dict[str, Mode] = {}
_COMPOSITES: dict[str, Callable[[Mode], Mode]] = {}
#: the aggregator whose step is the base mode's own finish (FedAvg over the secure sum)
SUM_AGGREGATOR = "fedavg"


def register_mode(mode: Mode) -> Mode:
    """Make ``mode`` (and its aliases) available by name; returns it. Re-registering a name replaces it."""
    for n in (mode.name, *mode.aliases):
        _MODES[n] = mode
    return mode


def register_composite(name: str, build: Callable[[Mode], Mode]) -> None:
    """Make aggregator ``name`` available: ``build(base_mode)`` gives the composite mode of a round."""
    _COMPOSITES[name] = build


def unregister(name: str) -> None:
    """Remove a mode or composite registered under ``name`` (tests)."""
    _MODES.pop(name, None)
    _COMPOSITES.pop(name, None)


def mode_names() -> list[str]:
    """Registered mode names (aliases included), sorted."""
    return sorted(_MODES)


def aggregator_names() -> list[str]:
    """Aggregators the network can run: FedAvg over any mode, and every registered composite."""
    return [SUM_AGGREGATOR, *sorted(_COMPOSITES)]


def resolve(mode: str, aggregator: str = SUM_AGGREGATOR) -> Mode:
    """The :class:`Mode` of a round with secure-aggregation ``mode`` and ``aggregator``.

    Raises ``ConfigError`` naming the field and the allowed values for an unknown name.
    """
    base = _MODES.get(mode)
    if base is None:
        raise ConfigError(f"federation.mode={mode!r}: use one of {mode_names()} over the network")
    if aggregator == SUM_AGGREGATOR:
        return base
    build = _COMPOSITES.get(aggregator)
    if build is None:
        raise ConfigError(f"federation.aggregator={aggregator!r}: over the network use one of {aggregator_names()} "
                          "(ties/hties need every update in the clear)")
    return build(base)


def make_client_stages(cfg: dict, vector, sid: int, identity_key=None, used_sessions=None,
                       operator=None, num_examples: int | None = None, graph_nonce: bytes | None = None) -> ClientStages:
    """Client stages for the mode (and aggregator) named in a *verified* round config.

    ``operator``: the pinned operator public key (composites verify signed phase messages with it).
    ``num_examples``: this client's example count, required when the round config asks for
    example-weighted FedAvg (the vector sent is then :func:`protocol.weighting.weighted_input`).
    ``graph_nonce``: the nonce this site committed to at ``join`` (SecAgg+ graph seed).
    The binding context signed into the key agreement is the digest of ``cfg`` as verified
    (:func:`wire.binding.round_config_digest`), taken before any local change to it.
    Raises ``ProtocolAbort`` for a mode this client does not support or a missing count.
    """
    from fedproxy_secure.errors import ProtocolAbort
    from fedproxy_secure.wire.binding import round_config_digest
    from fedproxy_secure.protocol.weighting import round_weighting, weighted_input

    context = round_config_digest(cfg)
    cap = round_weighting(cfg)
    if cap is not None:
        if num_examples is None:
            raise ProtocolAbort("the round asks for example-weighted FedAvg but this client passed no num_examples")
        vector = weighted_input(vector, num_examples, cap, float(cfg["clip_norm"]))
        cfg = {**cfg, "dim": int(cfg["dim"]) + 1}

    try:
        m = resolve(cfg["mode"], cfg.get("aggregator", SUM_AGGREGATOR))
    except ConfigError as exc:
        raise ProtocolAbort(f"round config mode {cfg.get('mode')!r} is not supported by this client: {exc}") from None
    return m.client_stages(cfg, vector, sid, identity_key=identity_key, used_sessions=used_sessions,
                           operator=operator, context=context, graph_nonce=graph_nonce)


def _register_builtin() -> None:
    from fedproxy_secure.protocol.modes.he import HEMode
    from fedproxy_secure.protocol.modes.masking import MaskingMode
    from fedproxy_secure.protocol.modes.plain import PlainMode
    from fedproxy_secure.protocol.modes.sa_hties import SAHTiesMode

    register_mode(PlainMode())
    register_mode(MaskingMode())
    register_mode(HEMode())
    register_composite("sa_hties", SAHTiesMode)


_register_builtin()
