"""``client train`` without a server: config file, data file, one round, update + report on disk.

Config (YAML, validated; errors name the field)::

    client:
      round_id: 0            # rounds are numbered by the caller; a budget never trains one twice
      a_seed: 0              # the federation's A seed (FFA-LoRA)
      planned_rounds: 3      # the DP plan (σ is derived for planned_rounds × local_steps)
      budget_file: budget.json   # relative to --state-dir
      lora: {r: 8, alpha: 16, ffa: true}
      train: {lr: 2e-4, local_steps: 10, batch_size: 8, update_clip_norm: 1.0}
      max_length: 256
      pcr_lambda: 1.0e-5
      dp: {enabled: true, epsilon: 8, delta: 1.0e-5, max_grad_norm: 1.0}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import Field, ValidationError

from fedproxy_secure.config import DPConfig, LoraConfig, TrainConfig, format_validation_error, read_yaml_mapping
from fedproxy_secure.errors import ConfigError, DataError
from fedproxy_secure.strict import StrictModel


class ClientTrainSection(StrictModel):
    round_id: int = Field(0, ge=0)
    a_seed: int = 0
    planned_rounds: int = Field(1, ge=1)
    budget_file: str = "budget.json"
    max_length: int = Field(256, ge=8)
    pcr_lambda: float = Field(1e-5, ge=0)
    limit: Optional[int] = Field(None, ge=1, description="use at most this many examples")
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    dp: DPConfig = DPConfig()


class ClientTrainFile(StrictModel):
    client: ClientTrainSection


def load_client_train_config(path: str | Path) -> ClientTrainSection:
    """Read and validate the YAML; ConfigError naming the field (``client.train.lr = -1: ...``)."""
    data = read_yaml_mapping(path)
    try:
        return ClientTrainFile.model_validate(data).client
    except ValidationError as exc:
        raise ConfigError("config error: " + format_validation_error(exc, model=ClientTrainFile)) from None


def load_examples(path: str | Path, limit: int | None = None) -> list:
    """JSONL prompt/response records (``*.jsonl``) or a BIG-bench task file (``*.json``)."""
    from fedproxy_secure.data import load_jsonl, load_task

    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data: file {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        return load_jsonl(path, max_records=limit)
    if path.suffix == ".json":
        exs = list(load_task(path.parent, path.stem).examples)
        return exs[:limit] if limit else exs
    raise DataError(f"--data: {path.name}: use a .jsonl file of prompt/response records or a BIG-bench .json task")


def write_update(out: str | Path, delta: np.ndarray, report: dict) -> tuple[Path, Path]:
    """Write ``out`` (safetensors: ``delta`` float64) and ``out`` with suffix .json (the report)."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"delta": torch.from_numpy(np.ascontiguousarray(delta, dtype=np.float64))}, str(out),
              metadata={"format": "fedproxy-lora-delta", "round_id": str(report.get("round_id", ""))})
    rep = out.with_suffix(".json")
    tmp = rep.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=float))
    os.replace(tmp, rep)
    return out, rep


def run_local_round(model, tokenizer, examples, cfg: ClientTrainSection, *, state_dir: str | Path,
                    theta_global: np.ndarray | None = None, conflict: np.ndarray | None = None,
                    progress=None) -> tuple[np.ndarray, dict]:
    """Attach LoRA, train one round per ``cfg`` (DP budget kept in ``state_dir``); return (delta, report)."""
    from fedproxy_secure.client.trainer import ClientRoundSpec, train_round
    from fedproxy_secure.lora import attach_lora, get_lora_vector, lora_shapes
    from fedproxy_secure.privacy import PrivacyBudget

    pm = attach_lora(model, cfg.lora, cfg.a_seed)
    theta = get_lora_vector(pm) if theta_global is None else np.asarray(theta_global, dtype=np.float64)
    budget = None
    if cfg.dp.enabled:
        budget = PrivacyBudget(Path(state_dir) / cfg.budget_file, cfg.dp.epsilon, cfg.dp.delta)
    spec = ClientRoundSpec(
        round_id=cfg.round_id, a_seed=cfg.a_seed, theta_global=theta, conflict=conflict, pcr_lambda=cfg.pcr_lambda,
        lr=cfg.train.lr, local_steps=cfg.train.local_steps, batch_size=cfg.train.batch_size, max_length=cfg.max_length,
        clip_norm=cfg.train.update_clip_norm, dp=cfg.dp if cfg.dp.enabled else None, planned_rounds=cfg.planned_rounds,
    )
    upd = train_round(pm, tokenizer, examples, spec, budget=budget, device=cfg.train.device, progress=progress)
    report = dict(upd.metrics, num_examples=upd.num_examples, lora_names=list(lora_shapes(pm)),
                  lora_shapes=[list(s) for s in lora_shapes(pm).values()], a_seed=cfg.a_seed,
                  lora=cfg.lora.model_dump(mode="json"))
    return upd.delta, report
