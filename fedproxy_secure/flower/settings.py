"""The Flower app's settings: one pydantic model at the boundary (Flower's run config / node config).

Flower passes ``context.run_config`` (from ``[tool.flwr.app.config]`` and ``flwr run --run-config``)
and ``context.node_config`` (per SuperNode, ``--node-config``) as flat ``str -> scalar`` maps; this
module turns them into a validated :class:`FlowerSettings` and refuses unknown keys.

Trust rule (enforced in :func:`client_keyset_path` and :func:`client_config_path`): the keyset a
client verifies the bundle against, and the FedProxy run YAML it takes its own DP budget, LoRA
shape and device from, are *the site's*. In the deployment runtime they must come from the
SuperNode's ``--node-config 'keyset=... fedproxy-config=...'``; the run config (written by whoever
submits the run) is used for them only in the simulation runtime, where server and clients are one
operator's processes on one machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from pydantic import Field, ValidationError

from fedproxy_secure.errors import ConfigError, SecurityError
from fedproxy_secure.strict import StrictModel

#: run-config key (Flower style, dashes) -> FlowerSettings field
_RUN_KEYS = {
    "fedproxy-config": "config", "keyset": "keyset", "operator-key": "operator_key", "secure": "secure",
    "out": "out", "state-root": "state_root", "max-weight": "max_weight", "num-shares": "num_shares",
    "reconstruction-threshold": "reconstruction_threshold", "clipping-range": "clipping_range",
    "quantization-range": "quantization_range", "min-clients": "min_clients", "bundle-valid-days": "bundle_valid_days",
    "bundle-version": "bundle_version", "torch-threads": "torch_threads", "evaluate": "evaluate",
    "timeout-s": "timeout_s", "reuse-partitions": "reuse_partitions",
}


class FlowerSettings(StrictModel):
    """Validated settings of one FedProxy-on-Flower run.

    ``config``: the FedProxy run YAML (model, data, rounds, train, lora, aggregator, dp, fusion) --
    the same file ``fedproxy-secure simulate`` reads, so both run the same method on the same inputs.
    ``secure``: ``"secaggplus"`` (every sum through Flower's SecAgg+; the server never sees one
    client's update) or ``"none"`` (the server sees each update in the clear; needed by the
    plaintext H-TIES/TIES rules). SecAgg+ quantisation: values are clipped to
    ``[-clipping_range, clipping_range]`` and stochastically rounded onto ``quantization_range``
    levels; FedAvg's client weight (its example count) must not exceed ``max_weight``.
    """

    config: Path
    keyset: Optional[Path] = None
    operator_key: Optional[Path] = None
    secure: Literal["secaggplus", "none"] = "secaggplus"
    out: Path = Path("runs/flower")
    state_root: Optional[Path] = None
    max_weight: float = Field(64.0, gt=0, description="largest FedAvg client weight (example count) SecAgg+ accepts")
    num_shares: float = Field(1.0, gt=0, description="SecAgg+ neighbours: int > 2, or a fraction of the cohort")
    reconstruction_threshold: float = Field(0.67, gt=0, description="SecAgg+ threshold: int, or a fraction of num_shares")
    clipping_range: float = Field(1.0, gt=0, description="SecAgg+ clip range; FedProxy's summed values lie in [-1, 1]")
    quantization_range: int = Field(1 << 22, gt=1)
    min_clients: int = Field(2, ge=2)
    bundle_valid_days: int = Field(30, ge=1)
    bundle_version: int = Field(1, ge=0)
    torch_threads: int = Field(1, ge=1)
    evaluate: bool = True
    timeout_s: Optional[float] = Field(None, gt=0)
    reuse_partitions: bool = Field(False, description="simulation scale runs only: virtual node p trains on "
                                   "partition p mod clients.count (several nodes share one site's data)")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], base: Path | None = None) -> "FlowerSettings":
        """Parse Flower's flat run config; relative paths resolve against ``base`` (default: cwd).

        Raises ConfigError naming an unknown key or an invalid value.
        """
        data: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in _RUN_KEYS:
                raise ConfigError(f"Flower run config: unknown key {key!r}; known: {', '.join(sorted(_RUN_KEYS))}")
            if value == "" and _RUN_KEYS[key] in ("keyset", "operator_key", "state_root"):
                continue  # an empty string in pyproject means "not set"
            data[_RUN_KEYS[key]] = value
        base = Path(base) if base is not None else Path.cwd()
        for k in ("config", "keyset", "operator_key", "out", "state_root"):
            if k in data and not Path(str(data[k])).is_absolute():
                data[k] = base / str(data[k])
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"Flower run config is invalid: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None

    def to_run_config(self) -> dict[str, Any]:
        """The flat run-config form (inverse of :meth:`from_run_config`; ``None`` fields left out)."""
        inv = {v: k for k, v in _RUN_KEYS.items()}
        out: dict[str, Any] = {}
        for field, value in self.model_dump().items():
            if value is not None:
                out[inv[field]] = str(value) if isinstance(value, Path) else value
        return out

    def shares_arg(self) -> int | float:
        """``num_shares`` as Flower wants it: an int (> 2) when whole, else a fraction of the cohort."""
        v = self.num_shares
        return int(v) if float(v).is_integer() and v > 2 else float(v)

    def threshold_arg(self) -> int | float:
        """``reconstruction_threshold`` for Flower: an int when whole and > 1, else a fraction."""
        v = self.reconstruction_threshold
        return int(v) if float(v).is_integer() and v > 1 else float(v)


def client_keyset_path(node_config: Mapping[str, Any], settings: FlowerSettings) -> Path:
    """The keyset a client pins (see the module docstring for the rule).

    Raises SecurityError in the deployment runtime when the SuperNode has no ``keyset`` node config:
    a client never takes its trust anchor from the server-side run config there.
    """
    if node_config.get("keyset"):
        return Path(str(node_config["keyset"]))
    if "partition-id" in node_config and settings.keyset is not None:
        return settings.keyset  # simulation runtime: one operator, one machine
    raise SecurityError("this SuperNode has no pinned keyset: start it with --node-config 'keyset=\"/path/keyset.json\"' "
                        "(the run config is written by the server side and is never a client's trust anchor)")


def client_config_path(node_config: Mapping[str, Any], settings: FlowerSettings) -> Path:
    """The FedProxy run YAML a client reads its own settings from (DP, LoRA, device, data split).

    Same rule as :func:`client_keyset_path`; raises SecurityError on a SuperNode without
    ``--node-config fedproxy-config=...`` in the deployment runtime.
    """
    if node_config.get("fedproxy-config"):
        return Path(str(node_config["fedproxy-config"]))
    if "partition-id" in node_config:
        return settings.config
    raise SecurityError("this SuperNode has no FedProxy config of its own: start it with --node-config "
                        "'fedproxy-config=\"/path/site.yaml\"' (a client never takes its DP budget from the run config)")


def lora_fingerprint(cfg) -> str:
    """SHA-256 over the run config's LoRA section: server and clients must attach the same adapters."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(cfg.lora.model_dump(), sort_keys=True).encode()).hexdigest()
