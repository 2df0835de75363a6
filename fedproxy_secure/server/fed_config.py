"""The operator's ``federation.yaml`` for ``server init --config``: validated, then turned into
:class:`~fedproxy_secure.server.rounds.FederationSettings` with the LoRA vector size and the FFA A seed
that ``server init`` derives from the proxy bundle (never written by hand).

Example (every key optional; defaults shown)::

    url: https://127.0.0.1:8443     # the address the sites connect to (written into each site kit)
    hosts: []                       # extra names for the server certificate (url's host is always in it)
    rounds: 3
    min_clients: 3                  # clients needed before a round starts
    threshold: 2                    # minimum survivors of secure aggregation
    mode: masking                   # masking | he | plain
    aggregator: fedavg              # fedavg | sa_hties
    clip_norm: 1.0                  # L2 clip of each site's update
    max_aborts: 3                   # more aborted rounds than this stops the federation as failed
    deadlines: {join: 600}          # seconds per stage (others keep their defaults)
    lora: {r: 8, alpha: 16, ffa: true}
    train: {lr: 0.001, local_steps: 10, batch_size: 8, max_length: 256, lr_schedule: constant}
    server_optimizer: {name: avgm, lr: 1.0, beta1: 0.7}   # sgd | avgm | adam | yogi, applied to the secure sum
    dp: {enabled: true, epsilon: 8.0, delta: 1.0e-5}   # the DP policy every site must meet or exceed
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, ValidationError, field_validator

from fedproxy_secure.aggregate.server_opt import RECIPE_SERVER_OPTIMIZER, ServerOptimizerConfig
from fedproxy_secure.config import DPConfig, LoraConfig, format_validation_error, read_yaml_mapping
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.server.rounds import DEFAULT_DEADLINES, FederationSettings
from fedproxy_secure.strict import StrictModel

#: a real federation waits longer for its sites to check in than the demo
DEFAULT_JOIN_DEADLINE_S = 600.0


class TrainPolicy(StrictModel):
    """Local training each round (signed into every round config, applied by every site)."""

    lr: float = Field(1e-3, gt=0, description="client lr (FFA-LoRA: only B is trained)")
    local_steps: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(256, ge=8)
    pcr_lambda: float = Field(1e-5, ge=0)
    fedprox_mu: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="client lr over rounds")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine: the last round's lr as a fraction of lr")


class FederationFile(StrictModel):
    """The validated ``federation.yaml`` (see the module docstring)."""

    url: str = "https://127.0.0.1:8443"
    hosts: list[str] = Field(default_factory=list)
    rounds: int = Field(3, ge=1)
    min_clients: int = Field(3, ge=2)
    threshold: int = Field(2, ge=1)
    mode: Literal["masking", "he", "plain"] = "masking"
    aggregator: Literal["fedavg", "sa_hties"] = "fedavg"
    clip_norm: float = Field(1.0, gt=0)
    max_aborts: int = Field(3, ge=0)
    on_restart: Literal["resume", "abort"] = "resume"
    deadlines: dict[str, float] = Field(default_factory=dict)
    lora: LoraConfig = LoraConfig()
    train: TrainPolicy = TrainPolicy()
    dp: DPConfig = DPConfig(enabled=True)
    he: dict = Field(default_factory=dict)
    sa_hties: dict = Field(default_factory=dict)
    server_optimizer: ServerOptimizerConfig = Field(default_factory=lambda: RECIPE_SERVER_OPTIMIZER,
                                                    description="how the server applies each round's aggregate")

    @field_validator("url")
    @classmethod
    def _https_url(cls, v: str) -> str:
        u = urlparse(v)
        if u.scheme != "https" or not u.hostname or u.port is None:
            raise ValueError("use https://HOST:PORT (the address every site connects to)")
        return v

    @field_validator("deadlines")
    @classmethod
    def _known_stages(cls, v: dict[str, float]) -> dict[str, float]:
        bad = sorted(set(v) - set(DEFAULT_DEADLINES))
        if bad:
            raise ValueError(f"unknown stages {bad}; known: {', '.join(DEFAULT_DEADLINES)}")
        if any(not s > 0 for s in v.values()):
            raise ValueError("every deadline must be > 0 seconds")
        return v

    def server_hosts(self) -> tuple[str, ...]:
        """Names for the server certificate: the URL's host first, then ``hosts`` and localhost names."""
        out = [urlparse(self.url).hostname or "127.0.0.1", *self.hosts, "127.0.0.1", "localhost"]
        return tuple(dict.fromkeys(out))

    def port(self) -> int:
        """The port of ``url`` (what ``server start`` listens on by default)."""
        return int(urlparse(self.url).port or 8443)

    def to_settings(self, dim: int, a_seed: int) -> FederationSettings:
        """The federation settings with the bundle-derived ``dim`` and ``a_seed``; LoRA layout and DP
        policy go into ``train`` (signed into every round config). Raises ConfigError naming the field."""
        train = {**self.train.model_dump(mode="json"), "lora": self.lora.model_dump(mode="json"),
                 "dp": self.dp.model_dump(mode="json")}
        deadlines = {**DEFAULT_DEADLINES, "join": DEFAULT_JOIN_DEADLINE_S, **self.deadlines}
        return FederationSettings.from_dict({
            "rounds": self.rounds, "min_clients": self.min_clients, "threshold": self.threshold, "mode": self.mode,
            "dim": int(dim), "clip_norm": self.clip_norm, "aggregator": self.aggregator, "deadlines": deadlines,
            "train": train, "max_aborts": self.max_aborts, "on_restart": self.on_restart, "a_seed": int(a_seed),
            "he": dict(self.he), "sa_hties": dict(self.sa_hties),
            "server_optimizer": self.server_optimizer.model_dump(mode="json")})


def load_federation_yaml(path: str | Path) -> FederationFile:
    """Read and validate ``federation.yaml``; ConfigError names the file, the field and the fix.

    Also checks the combination (threshold <= min_clients, he/sa_hties options) with a trial
    :meth:`FederationFile.to_settings`, so a bad file fails before any key or folder is made.
    """
    path = Path(path)
    data = read_yaml_mapping(path)
    for k in ("dim", "a_seed"):
        if k in data:
            raise ConfigError(f"{path}: {k} is derived from the proxy bundle by 'server init' and fixed for the "
                              "federation's life; remove it")
    try:
        fed = FederationFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + format_validation_error(exc, model=FederationFile)) from None
    try:
        fed.to_settings(1, 0)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return fed

