"""Read a standard PEFT LoRA adapter folder (safetensors only) as merged deltas ``(α/r)·B·A``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from fedproxy_secure.errors import ModelError

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.(?P<ad>[^.]+))?\.weight$")


def _match_pattern(pattern: Mapping[str, float], module: str, default: float) -> float:
    for key, val in pattern.items():  # PEFT semantics: a key matches the module name's suffix
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return float(val)
    return default


def lora_deltas(
    state: Mapping[str, torch.Tensor], *, r: int, alpha: float, use_rslora: bool = False,
    fan_in_fan_out: bool = False, rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """``{module_name: (α/r)·B·A}`` (float32, in the module's weight layout) from LoRA A/B tensors.

    Guarantees: every module has both A and B or ModelError is raised; names carry no PEFT prefix.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _KEY.match(key)
        if m is None:
            if "lora_" in key or "modules_to_save" in key:
                raise ModelError(f"adapter: tensor {key!r} is not a plain LoRA A/B weight (modules_to_save, DoRA and bias are not fusable)")
            continue
        parts.setdefault(m.group("mod"), {})[m.group("ab")] = t
    out = {}
    for mod, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ModelError(f"adapter: module {mod!r} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"].float(), ab["B"].float()
        if b.shape[1] != a.shape[0]:
            raise ModelError(f"adapter: module {mod!r}: B {tuple(b.shape)} and A {tuple(a.shape)} ranks differ")
        rank = int(_match_pattern(rank_pattern or {}, mod, r))
        alp = _match_pattern(alpha_pattern or {}, mod, alpha)
        s = alp / math.sqrt(rank) if use_rslora else alp / rank
        d = (b @ a) * s
        out[mod] = d.T.contiguous() if fan_in_fan_out else d
    return out


def deltas_from_adapter(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Merged deltas of a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Refuses pickle weights (``adapter_model.bin``), non-LoRA adapters and missing files with
    ModelError. Module names are relative to the base model (e.g. ``model.layers.3.mlp.up_proj``).
    """
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg_path, st_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise ModelError(f"--lora: {str(d)!r} has no adapter_config.json; give a PEFT adapter folder")
    if not st_path.is_file():
        if (d / "adapter_model.bin").exists():
            raise ModelError(f"--lora: {str(d)!r} holds adapter_model.bin (pickle), which is refused; save with safe_serialization=True")
        raise ModelError(f"--lora: {str(d)!r} has no adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{cfg_path}: not valid JSON ({exc})") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ModelError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise ModelError(f"{cfg_path}: DoRA adapters are not supported by fusion")
    try:
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{cfg_path}: needs integer 'r' and number 'lora_alpha'") from None
    return lora_deltas(
        load_file(str(st_path)), r=r, alpha=alpha, use_rslora=bool(cfg.get("use_rslora", False)),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)), rank_pattern=cfg.get("rank_pattern") or {},
        alpha_pattern=cfg.get("alpha_pattern") or {},
    )


def deltas_from_peft_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """Merged deltas of every LoRA layer of an in-memory PEFT model (default adapter).

    Uses PEFT's own ``get_delta_weight`` so the scaling (α/r, rsLoRA, patterns) is PEFT's.
    """
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            base = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
            with torch.no_grad():
                out[base] = mod.get_delta_weight("default").detach().float().cpu().clone()
    if not out:
        raise ModelError("fusion: the model has no LoRA layers")
    return out
