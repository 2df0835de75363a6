"""The operator's federation settings (``federation.json``), validated with pydantic.

A pydantic dataclass: constructing one validates every field (types, ranges, literals) and then the
mode-dependent rules through the mode registry (the mode and aggregator exist, the settings
sections ``he`` / ``sa_hties`` belong to the chosen mode, each mode's own checks). Every failure is
a ``ConfigError`` naming the field (``federation.<field>``) and the fix.
"""

from __future__ import annotations

from dataclasses import field, fields
from typing import Literal, Optional

from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

from fedproxy_secure.errors import ConfigError
from fedproxy_secure.protocol.names import DEFAULT_DEADLINES

__all__ = ["FederationSettings", "DEFAULT_DEADLINES", "net_aggregators"]

_SECTIONS = ("he", "sa_hties")


def _default_deadlines() -> dict[str, float]:
    return dict(DEFAULT_DEADLINES)


@dataclass(config=ConfigDict(extra="forbid", strict=False))
class _Fields:
    rounds: int = 3
    min_clients: int = 3
    threshold: int = 2
    mode: str = "masking"
    dim: int = 16
    clip_norm: float = 1.0
    aggregator: str = "fedavg"
    deadlines: dict[str, float] = field(default_factory=_default_deadlines)
    train: dict = field(default_factory=dict)
    max_aborts: int = 10
    on_restart: Literal["resume", "abort"] = "resume"
    a_seed: Optional[int] = None
    he: dict = field(default_factory=dict)
    sa_hties: dict = field(default_factory=dict)
    #: FedAvg weights: uniform over survivors, or by each client's example count (capped at max_examples;
    #: set it near the largest site's count: the sum's noise (HE flooding, fixed point) is divided by Σ w_i)
    weighting: Literal["uniform", "examples"] = "uniform"
    max_examples: int = 10_000
    #: how the server applies each round's aggregate (aggregate.server_opt.ServerOptimizerConfig; {} = plain θ + Δ)
    server_optimizer: dict = field(default_factory=dict)


def _config_error(exc: ValidationError) -> ConfigError:
    e = exc.errors()[0]
    where = ".".join(str(x) for x in e["loc"]) or "?"
    inp = e.get("input")
    shown = repr(inp)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ConfigError(f"federation.{where} = {shown}: {e['msg']}")


class FederationSettings:
    """What the operator fixes for a federation (stored as ``federation.json``).

    Guarantees after construction: every field has its declared type; ``rounds >= 1``,
    ``2 <= min_clients``, ``1 <= threshold <= min_clients``, ``dim >= 1``, ``clip_norm > 0``,
    ``a_seed`` in ``[0, 2**63)`` or None, ``deadlines`` holds every default stage; ``mode`` and
    ``aggregator`` name registered modes; the ``he`` / ``sa_hties`` sections are set only for the
    mode that owns them and pass that mode's checks. Otherwise ``ConfigError`` naming the field.
    """

    __dataclass_fields__ = _Fields.__dataclass_fields__  # dataclasses.asdict / fields work on instances

    def __init__(self, **kw) -> None:
        try:
            v = _Fields(**kw)
        except ValidationError as exc:
            raise _config_error(exc) from None
        except TypeError as exc:  # an unknown keyword
            raise ConfigError(f"federation: {exc}; allowed keys: {sorted(_Fields.__dataclass_fields__)}") from None
        for f in fields(_Fields):
            setattr(self, f.name, getattr(v, f.name))
        self.deadlines = {**DEFAULT_DEADLINES, **(self.deadlines or {})}
        self.validate()

    def __repr__(self) -> str:
        return f"FederationSettings(mode={self.mode!r}, aggregator={self.aggregator!r}, rounds={self.rounds})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FederationSettings) and all(
            getattr(self, f) == getattr(other, f) for f in self.__dataclass_fields__)

    def validate(self) -> "FederationSettings":
        """Re-check the cross-field and mode rules (``ConfigError`` naming the field); returns ``self``."""
        from fedproxy_secure.protocol.modes import resolve

        if self.rounds < 1:
            raise ConfigError(f"federation.rounds={self.rounds}: must be >= 1")
        if self.min_clients < 2:
            raise ConfigError(f"federation.min_clients={self.min_clients}: secure aggregation needs >= 2")
        if not 1 <= self.threshold <= self.min_clients:
            raise ConfigError(f"federation.threshold={self.threshold}: must be in [1, min_clients]")
        if self.dim < 1 or not self.clip_norm > 0:
            raise ConfigError("federation.dim and federation.clip_norm must be positive")
        if self.a_seed is not None and not (isinstance(self.a_seed, int) and 0 <= self.a_seed < 2**63):
            raise ConfigError(f"federation.a_seed={self.a_seed!r}: use an integer in [0, 2**63)")
        if self.max_examples < 1:
            raise ConfigError(f"federation.max_examples={self.max_examples}: must be >= 1")
        self.optimizer()
        mode = resolve(self.mode, self.aggregator)
        owners = {m.settings_section: m.name for m in (mode, getattr(mode, "base", None)) if m is not None}
        for sec in _SECTIONS:
            if getattr(self, sec) and sec not in owners:
                what = "mode" if sec == "he" else "aggregator"
                cur = self.mode if sec == "he" else self.aggregator
                raise ConfigError(f"federation.{sec} is set but federation.{what} is {cur!r}; remove it or use "
                                  f"{what} {sec}")
        mode.validate_settings(self)
        return self

    def optimizer(self):
        """The validated server optimizer (``ConfigError`` naming ``federation.server_optimizer.<field>``)."""
        from fedproxy_secure.aggregate.server_opt import ServerOptimizerConfig

        try:
            return ServerOptimizerConfig.model_validate(self.server_optimizer or {})
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(x) for x in e["loc"])
            raise ConfigError(f"federation.server_optimizer.{where} = {e.get('input')!r}: {e['msg']} "
                              "(fix: see ServerOptimizerConfig in docs/operator-guide.md)") from None

    def client_lr(self, round_index: int) -> float:
        """The client lr of the 0-based ``round_index``-th completed round: ``train.lr`` under ``train.lr_schedule``
        (the same rule as ``simulate``: ``aggregate.server_opt.scheduled_lr``)."""
        from fedproxy_secure.aggregate.server_opt import scheduled_lr

        t = self.train or {}
        return scheduled_lr(float(t.get("lr", 2e-4)), str(t.get("lr_schedule", "constant")), round_index, self.rounds,
                            float(t.get("min_lr_ratio", 0.1)))

    def wire_dim(self) -> int:
        """Values each client secure-sums: ``dim``, plus its weight with ``weighting: examples``."""
        return self.dim + (1 if self.weighting == "examples" else 0)

    @classmethod
    def from_dict(cls, d: dict) -> "FederationSettings":
        """Build from a dict, refusing unknown keys (``ConfigError`` naming them)."""
        if not isinstance(d, dict):
            raise ConfigError(f"federation: expected a mapping, got {type(d).__name__}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"federation: unknown keys {sorted(unknown)}")
        return cls(**d)


def net_aggregators() -> tuple[str, ...]:
    """Aggregators the network can run (FedAvg and every registered composite)."""
    from fedproxy_secure.protocol.modes import aggregator_names

    return tuple(aggregator_names())
