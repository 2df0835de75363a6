"""The ``demo --config F`` file (and the presets ``examples/demo-tiny.yaml``, ``examples/demo.yaml``).

One file serves both ``demo`` and ``audit check``: ``clients``, ``federation``, ``dp``,
``transport`` and ``compress`` are the sections ``audit check`` reads; ``model``, ``data``,
``lora`` and ``eval`` are demo-only (``audit check`` lists them as ignored). DP is stated once,
at the top level; the demo copies it into ``federation.train.dp`` (the operator's signed policy,
which every client checks against its own settings) and into each client's ``client.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError

from fedproxy_secure.config import CompressConfig, DPConfig, LoraConfig, TinyModelSpec, format_validation_error, read_yaml_mapping
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.protocol.settings import FederationSettings
from fedproxy_secure.strict import StrictModel

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PRESETS = {"tiny": EXAMPLES / "demo-tiny.yaml", "smollm": EXAMPLES / "demo.yaml"}


class DemoClients(StrictModel):
    count: int = Field(3, ge=2)
    threads: int = Field(1, ge=1, description="torch threads per client process")
    policy: dict = Field(default_factory=dict, description="each site's client.yaml policy (client/policy.py); "
                         "default: the safe policy")


class DemoModel(StrictModel):
    source: Literal["smollm2", "tiny"] = "tiny"
    tiny: TinyModelSpec = TinyModelSpec()


class DemoData(StrictModel):
    """The demo's tasks. ``dir`` (client and test tasks) and ``calib_dir`` (the server's calibration
    tasks) are folders relative to the file, or ``vendored:bigbench`` / ``vendored:bigbench-skill``
    (the tasks shipped in the package). Unset, each group resolves by the one order of
    ``fedproxy_secure/data/resolve.py``: the vendored copy, then the pinned bigbench sdist."""

    source: Optional[Literal["fetch", "dir"]] = Field(None, description="legacy: 'dir' requires data.dir, "
                                                      "'fetch' means no data.dir (the resolution order)")
    dir: Optional[Path] = Field(None, description="client/test task folder or vendored:<set>; default: the "
                                "resolution order (vendored copy, then the pinned sdist)")
    calib_dir: Optional[Path] = Field(None, description="calibration task folder or vendored:<set>; default: "
                                      "data.dir when set, else the resolution order")
    tasks: list[str] = Field(min_length=2)
    calib_tasks: list[str] = Field(min_length=1, description="server-only calibration tasks no client holds")
    limit_train: int = Field(50, ge=8)
    limit_test: int = Field(30, ge=1)
    seed: int = 0


class DemoEval(StrictModel):
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(256, ge=16)
    proxy: bool = Field(False, description="also evaluate the proxy before/after (costs time)")
    threads: int = Field(2, ge=1, description="torch threads for server-side work (compress, fuse, evaluate)")
    fusion: Literal["logit", "weight"] = Field("logit", description="plug-in written as the signed fused folder "
                                               "that is evaluated (fuse.load_fused_model)")
    beta: float = Field(1.0, ge=0, description="logit plug-in weight")
    no_dp_baseline: bool = Field(True, description="also run the same federation without DP (its own server "
                                 "and sites) so the report shows what was learned and what DP costs")
    server_restarts: int = Field(1, ge=0, description="times the demo restarts a crashed server process")


class DemoSpec(StrictModel):
    name: str = "demo"
    description: str = ""
    clients: DemoClients = DemoClients()
    model: DemoModel = DemoModel()
    data: DemoData
    compress: CompressConfig = CompressConfig()
    lora: LoraConfig = LoraConfig()
    dp: DPConfig = DPConfig(enabled=True)
    federation: dict = Field(default_factory=dict)
    transport: dict = Field(default_factory=dict)
    eval: DemoEval = DemoEval()
    timeout_s: float = Field(900.0, gt=0, description="wall-clock limit for the federation stage")

    def settings(self, dim: int, a_seed: int) -> FederationSettings:
        """The federation settings: the file's ``federation`` plus ``dim``, ``a_seed`` and the
        federation-wide LoRA layout and DP policy in ``train`` (signed into every round config)."""
        fed = dict(self.federation)
        for k in ("dim", "a_seed"):
            if k in fed:
                raise ConfigError(f"federation.{k}: set by the demo (LoRA vector length / fixed A seed); remove it")
        train = dict(fed.get("train") or {})
        if "dp" in train:
            raise ConfigError("federation.train.dp: state DP once, in the top-level 'dp' section")
        train["lora"] = self.lora.model_dump(mode="json")
        train["dp"] = self.dp.model_dump(mode="json")
        fed.update(dim=int(dim), a_seed=int(a_seed), train=train)
        return FederationSettings.from_dict(fed)


def load_demo_spec(preset: str | None = None, config: str | os.PathLike | None = None) -> tuple[DemoSpec, Path]:
    """The demo spec from ``--config`` or ``--preset`` and the file it came from.

    Relative ``data.dir`` / ``data.calib_dir`` resolve against the file's folder and ``vendored:<set>``
    becomes that vendored folder. Raises ConfigError naming the field.
    """
    if config is None:
        if preset not in PRESETS:
            raise ConfigError(f"--preset {preset!r}: use one of {', '.join(PRESETS)} or pass --config FILE")
        config = PRESETS[preset]
    path = Path(config)
    data = read_yaml_mapping(path)
    if isinstance(data.get("clients"), int):
        data["clients"] = {"count": data["clients"]}
    try:
        spec = DemoSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + format_validation_error(exc, model=DemoSpec)) from None
    d = spec.data
    if d.source == "dir" and d.dir is None:
        raise ConfigError(f"{path}: data.dir is required with data.source: dir")
    if d.source == "fetch" and d.dir is not None:
        raise ConfigError(f"{path}: data.source: fetch conflicts with data.dir (fix: remove data.source; data.dir "
                          "alone names the folder)")
    from fedproxy_secure.data.resolve import data_dir_value

    folders = {k: data_dir_value(getattr(d, k), f"{path}: data.{k}", path.resolve().parent)
               for k in ("dir", "calib_dir") if getattr(d, k) is not None}
    spec = spec.model_copy(update={"data": d.model_copy(update=folders)})
    overlap = set(d.tasks) & set(d.calib_tasks)
    if overlap:
        raise ConfigError(f"{path}: data.calib_tasks {sorted(overlap)} are also client tasks; calibration must be "
                          "server data no client holds")
    if spec.clients.count > len(d.tasks):
        raise ConfigError(f"{path}: clients.count = {spec.clients.count} exceeds the {len(d.tasks)} data.tasks")
    FederationSettings.from_dict({k: v for k, v in spec.federation.items() if k not in ("dim", "a_seed")})
    return spec, path
