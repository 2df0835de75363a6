"""The one YAML schema of a federation run, validated before any work starts.

``load_run_config(path)`` returns a :class:`RunConfig` or raises :class:`ConfigError` whose message
names the field path, the bad value and the fix, e.g.::

    config error: train.lr = -0.001: must be > 0 (fix: use a positive learning rate such as 2e-4)
"""

from __future__ import annotations

import difflib
import reprlib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedproxy_secure.aggregate.server_opt import RECIPE_SERVER_OPTIMIZER, ServerOptimizerConfig
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.strict import StrictModel


class TinyModelSpec(StrictModel):
    """A tiny randomly initialised model built from a config (tests, demos; no download)."""

    arch: Literal["llama", "gpt2"] = "llama"
    layers: int = Field(8, ge=2, le=64)
    hidden: int = Field(64, ge=8)
    heads: int = Field(4, ge=1)
    intermediate: int = Field(128, ge=8)
    vocab: int = Field(512, ge=64, description="byte-level tokenizer needs >= 260")
    max_positions: int = Field(256, ge=16)
    seed: int = 0


class ModelConfig(StrictModel):
    """The server's LLM: a local Hugging Face folder, or a tiny model built from a spec."""

    llm: Optional[Path] = None
    tiny: Optional[TinyModelSpec] = None

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.llm is None) == (self.tiny is None):
            raise ValueError("give exactly one of model.llm (a local HF folder) or model.tiny (a spec)")
        if self.llm is not None and not (Path(self.llm) / "config.json").is_file():
            raise ValueError(f"model.llm: {self.llm} has no config.json; point it at a Hugging Face model folder")
        return self


class CompressConfig(StrictModel):
    """Stage i: server-guided compression of the LLM into the proxy."""

    strategy: Literal["bi", "uniform"] = "bi"
    keep_ratio: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of blocks kept (1 - p)")
    distill: bool = False
    distill_steps: int = Field(0, ge=0)
    distill_lr: float = Field(1e-4, gt=0)
    calib_examples: int = Field(64, ge=1)
    ot_adapter_blocks: int = Field(2, ge=0, description="Offsite-Tuning: first/last n blocks")


class DataConfig(StrictModel):
    """Client data and evaluation data (BIG-bench multiple-choice tasks or JSONL prompt/response).

    ``dir`` and ``calib_dir`` are folders (relative to the YAML file) or ``vendored:bigbench`` /
    ``vendored:bigbench-skill``: the BIG-bench tasks shipped in the package (no download; see
    ``fedproxy_secure/data/resolve.py``), stored here as that folder's path. ``calib_tasks`` are
    server-side text and never a client task.
    """

    source: Literal["bigbench", "jsonl"] = "bigbench"
    dir: Path = Field(description="folder of <task>.json, or vendored:bigbench / vendored:bigbench-skill")
    tasks: Optional[list[str]] = None
    calib_tasks: list[str] = Field(default_factory=list, description="server-only tasks for calibration")
    calib_dir: Optional[Path] = Field(None, description="folder of the calib_tasks, or vendored:<set> "
                                      "(default: data.dir)")
    partition: Literal["task", "iid", "dirichlet"] = "task"
    dirichlet_alpha: float = Field(0.5, gt=0)
    limit_train: int = Field(200, ge=1)
    limit_test: int = Field(100, ge=1)
    max_length: int = Field(256, ge=16)

    @field_validator("dir", "calib_dir", mode="before")
    @classmethod
    def _vendored(cls, value: Any, info: ValidationInfo) -> Any:
        from fedproxy_secure.data.resolve import VENDORED_SCHEME, data_dir_value

        if isinstance(value, str) and value.startswith(VENDORED_SCHEME):
            try:
                return data_dir_value(value, f"data.{info.field_name}")
            except ConfigError as exc:
                raise ValueError(str(exc).split(": ", 1)[1]) from None
        return value

    @model_validator(mode="after")
    def _dir_exists(self) -> "DataConfig":
        for name in ("dir", "calib_dir"):
            d = getattr(self, name)
            if d is not None and not Path(d).is_dir():
                raise ValueError(
                    f"data.{name}: folder {str(d)!r} does not exist; create it, or use the tasks shipped with "
                    f"the package: data.{name}: vendored:bigbench (8 dev tasks) or vendored:bigbench-skill"
                )
        overlap = sorted(set(self.tasks or ()) & set(self.calib_tasks))
        if overlap:
            raise ValueError(f"data.calib_tasks: {', '.join(overlap)} also in data.tasks; calibration text must be "
                             "server data no client holds (fix: remove them from one of the two lists)")
        return self


class ClientsConfig(StrictModel):
    count: int = Field(4, ge=1, le=10000)


class TrainConfig(StrictModel):
    """Local training on each client (per round)."""

    lr: float = Field(1e-3, gt=0, description="client lr; FFA-LoRA trains only B (docs/decisions/federation-recipe.md)")
    local_steps: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    update_clip_norm: float = Field(1.0, gt=0, description="L2 bound of each client's update; binding on purpose: "
                                    "a per-client trust region against drift under label skew "
                                    "(docs/decisions/federation-recipe.md)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="client lr over rounds: constant, or cosine from lr to min_lr_ratio * lr")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine schedule: the last round's lr as a fraction of lr")
    device: str = "cpu"

    def lr_for_round(self, round_index: int, total_rounds: int) -> float:
        """The client learning rate of 0-based round ``round_index`` (one rule: ``aggregate.server_opt.scheduled_lr``)."""
        from fedproxy_secure.aggregate.server_opt import scheduled_lr

        return scheduled_lr(self.lr, self.lr_schedule, round_index, total_rounds, self.min_lr_ratio)


class LoraConfig(StrictModel):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Optional[list[str]] = None
    ffa: bool = Field(True, description="freeze A (FFA-LoRA): exact aggregation of B")


class AggregatorConfig(StrictModel):
    name: Literal["fedavg", "fedprox", "ties", "hties", "sa_hties"] = "fedavg"
    pcr_lambda: float = Field(1e-5, ge=0)
    fedprox_mu: float = Field(0.01, ge=0)
    r0: float = Field(1.0, ge=0, le=1)
    delta: float = Field(0.2, ge=0, le=1)
    rho: float = Field(1.1, ge=1.0)
    ties_density: float = Field(0.2, gt=0, le=1)
    server_optimizer: ServerOptimizerConfig = Field(
        default_factory=lambda: RECIPE_SERVER_OPTIMIZER,
        description="how the server applies the aggregate (sgd, avgm, adam, yogi); default FedAvgM, lr 1, momentum 0.7, "
                    "chosen on validation curves (docs/decisions/federation-recipe.md)")


class SecAggConfig(StrictModel):
    mode: Literal["none", "masking", "he"] = "none"
    threshold: Optional[int] = Field(None, ge=2, description="t; default ceil(2n/3)")
    dropout: float = Field(0.0, ge=0, lt=1, description="simulated fraction of clients that drop")

    def threshold_for(self, n: int) -> int:
        """The threshold t for a cohort of ``n`` clients: the one rule, ``wire.threshold.effective_threshold``."""
        from fedproxy_secure.wire.threshold import effective_threshold

        return effective_threshold(self.mode, n, self.threshold)


class DPConfig(StrictModel):
    enabled: bool = False
    epsilon: float = Field(8.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["prv", "rdp"] = "prv"


class FusionConfig(StrictModel):
    """Stage iii plug-in. Default ``logit`` (proxy-tuning): best transfer in every SmolLM2 measurement
    (federated: 0.78-0.89 of the centralized gain; fusion study at the reference size: 0.66 with a
    distilled proxy vs 0.53 for the dense delta plug-in). Both transfer only when the proxy was distilled
    towards the LLM (``compress.distill``; undistilled: 0.16 logit, 0.09 write-back, docs/experiments.md).
    ``weight`` gives a dense LLM with no inference overhead."""

    method: Literal["weight", "logit"] = "logit"
    scale: float = Field(1.0, ge=0)
    logit_beta: float = Field(1.0, ge=0)


class OutputConfig(StrictModel):
    dir: Path = Path("runs/default")


class RunConfig(StrictModel):
    """A whole federation run: what ``simulate`` and ``demo`` execute."""

    name: str = "run"
    seed: int = 0
    model: ModelConfig
    compress: CompressConfig = CompressConfig()
    data: DataConfig
    clients: ClientsConfig = ClientsConfig()
    rounds: int = Field(2, ge=1, le=10000)
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()
    aggregator: AggregatorConfig = AggregatorConfig()
    secagg: SecAggConfig = SecAggConfig()
    dp: DPConfig = DPConfig()
    fusion: FusionConfig = FusionConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        n = self.clients.count
        if self.secagg.mode != "none" and self.secagg.threshold_for(n) > n:
            raise ValueError(
                f"secagg.threshold: {self.secagg.threshold} exceeds clients.count={n}; use t <= n"
            )
        return self


_FIXES = {
    "greater_than": "use a value above the bound",
    "greater_than_equal": "use a value at or above the bound",
    "less_than": "use a value below the bound",
    "less_than_equal": "use a value at or below the bound",
    "literal_error": "use one of the allowed values",
    "missing": "add this field",
    "int_parsing": "use an integer",
    "float_parsing": "use a number",
    "bool_parsing": "use true or false",
}


def _known_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at ``loc``'s parent (for 'did you mean' hints)."""
    cur: Any = model
    for part in loc[:-1]:
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cur = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cur is None:
            return []
    return list(getattr(cur, "model_fields", {}))


#: longest repr of a user value in any error message (a value can be as large as the config file)
MAX_REPR_CHARS = 200

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = MAX_REPR_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def short_repr(value: Any, limit: int = MAX_REPR_CHARS) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (with ``...``); bounded work for any size of value."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def format_validation_error(exc: ValidationError, model: type[BaseModel] = None) -> str:
    """One line per problem: ``field.path = value: what is wrong (fix: ...)``."""
    model = model or RunConfig
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        value = err.get("input")
        kind = err["type"]
        if kind == "extra_forbidden":
            known = _known_fields(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(known)}"
            lines.append(f"{path}: unknown field (fix: remove it; {hint})")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        fix = _FIXES.get(kind)
        shown = "" if kind == "missing" or isinstance(value, dict) else f" = {short_repr(value)}"
        lines.append(f"{path}{shown}: {msg}" + (f" (fix: {fix})" if fix else ""))
    return "; ".join(lines)


def parse_run_config(data: dict[str, Any], base_dir: Path | None = None) -> RunConfig:
    """Validate a config mapping; relative paths resolve against ``base_dir`` (the YAML's folder)."""
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping of sections (model, data, ...)")
    data = _resolve_paths(data, base_dir) if base_dir else data
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("config error: " + format_validation_error(exc)) from None


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for section, key in (("model", "llm"), ("data", "dir"), ("data", "calib_dir")):
        sec = out.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and not sec[key].startswith("vendored:"):
            p = Path(sec[key]).expanduser()
            sec[key] = str(p if p.is_absolute() else base / p)  # relative to the YAML file
    return out


#: largest config file read (bytes); anything bigger is refused before parsing
MAX_CONFIG_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases: a config never needs them, and an alias bomb
    (a 1.4 KB file that expands to gigabytes) is stopped at its first ``&anchor``."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise ConfigError(f"config {self.name}: line {mark.line + 1}: YAML anchors/aliases (&name, *name, <<) are "
                              "not allowed in fedproxy-secure configs (fix: write the values out in full)")
        return super().compose_node(parent, index)


def read_yaml_mapping(path: str | Path, what: str = "--config") -> dict[str, Any]:
    """The top-level mapping of a YAML config file: the one reader every config goes through.

    Guarantees, each a ``ConfigError`` with one line naming ``what``/the file and the fix, raised before
    any large allocation: the path exists and is a regular file (a folder is named as such), it is at
    most :data:`MAX_CONFIG_BYTES` bytes (checked before reading, and the read is capped), it is UTF-8,
    it is YAML without anchors/aliases (no expansion bombs), and its top level is a mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what}: {str(path)!r} is a directory; pass the YAML file itself (e.g. {path}/config.yaml)")
    if not path.is_file():
        raise ConfigError(f"{what}: file {str(path)!r} does not exist")
    too_big = (f"{what}: {str(path)!r} is larger than the {MAX_CONFIG_BYTES} bytes (1 MiB) a config may have; "
               "pass the YAML config, not a data or model file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(too_big)
    with path.open("rb") as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)  # capped even if the file grows or is not a regular size
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(too_big)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what}: {str(path)!r} is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                          "save it as UTF-8") from None
    loader = _NoAliasLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        why = " ".join(str(exc).split())  # one line
        raise ConfigError(f"config {path}: not valid YAML: {why[:400]}") from None
    finally:
        loader.dispose()
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of sections")
    return data


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config; raise ConfigError naming the field on any problem."""
    return parse_run_config(read_yaml_mapping(path), base_dir=Path(path).parent.resolve())


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    """A JSON-able dict of ``cfg`` (paths as strings), for results files."""
    return cfg.model_dump(mode="json")
