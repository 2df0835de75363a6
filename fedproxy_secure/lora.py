"""LoRA on the proxy, shared by clients and the server: attach, name, flatten, save, merge.

Every party calls :func:`attach_lora` with the same ``LoraConfig`` and ``a_seed`` and gets the same
LoRA A matrices (drawn from a ``torch.Generator`` in a fixed name order) and zero B matrices. With
FFA-LoRA (``ffa=True``, the default) A is frozen, so averaging B across clients equals averaging
ΔW = (α/r)·B·A exactly. The flattened *trainable* LoRA vector, in :func:`lora_names` order, is what
clients train and send and what the server aggregates.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedproxy_secure.config import LoraConfig
from fedproxy_secure.errors import ModelError

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]

_ADAPTER = "default"
_PREFIX = "base_model.model."


def default_target_modules(model: nn.Module) -> list[str]:
    """The LoRA target module names for ``model``'s family (Llama-like or GPT-2-like).

    Raises ModelError for a model with none of the known projection names.
    """
    leafs = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if set(LLAMA_TARGETS) <= leafs:
        return list(LLAMA_TARGETS)
    if set(GPT2_TARGETS) <= leafs:
        return list(GPT2_TARGETS)
    found = [t for t in LLAMA_TARGETS + GPT2_TARGETS if t in leafs]
    if found:
        return found
    raise ModelError(
        f"lora.target_modules: cannot guess targets for {type(model).__name__}; set lora.target_modules "
        "to the names of its linear projections (e.g. [q_proj, v_proj])"
    )


def _is_conv1d_family(model: nn.Module, targets: list[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, m in model.named_modules())


def stable_name(peft_name: str) -> str:
    """A peft parameter name without the wrapper prefix and adapter name.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` ->
    ``model.layers.0.self_attn.q_proj.lora_A.weight``; also strips opacus' ``_module.``.
    """
    n = peft_name
    while n.startswith("_module."):
        n = n[len("_module."):]
    if n.startswith(_PREFIX):
        n = n[len(_PREFIX):]
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", n)


def _lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """All LoRA parameters (A and B) of ``model`` by stable name."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            out[stable_name(name)] = p
    return out


def attach_lora(model: nn.Module, lora_cfg: LoraConfig, a_seed: int):
    """Wrap ``model`` in a peft LoRA model, deterministic in ``(lora_cfg, a_seed)``.

    Guarantees: every LoRA A is drawn from ``torch.Generator().manual_seed(a_seed)`` in sorted
    stable-name order with peft's default scale (uniform ±1/sqrt(fan_in)); every B is zero; the base
    model's weights are frozen; with ``lora_cfg.ffa`` A is frozen too (only B is trainable). Two calls
    with the same inputs on the same architecture give identical LoRA states.
    """
    import peft

    targets = list(lora_cfg.target_modules or default_target_modules(model))
    pcfg = peft.LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM", fan_in_fan_out=_is_conv1d_family(model, targets),
    )
    try:
        pm = peft.get_peft_model(model, pcfg)
    except ValueError as exc:
        raise ModelError(f"lora.target_modules = {targets}: {exc}") from None
    gen = torch.Generator().manual_seed(int(a_seed))
    params = _lora_params(pm)
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(p.shape[1])
                draw = torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 * bound - bound
                p.copy_(draw.to(p.dtype))
                p.requires_grad_(not lora_cfg.ffa)
            else:
                p.zero_()
                p.requires_grad_(True)
    return pm


def lora_names(model: nn.Module) -> list[str]:
    """Stable names of the trainable LoRA parameters, sorted (the layout of the LoRA vector)."""
    return sorted(n for n, p in _lora_params(model).items() if p.requires_grad)


def lora_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shape of every trainable LoRA parameter by stable name."""
    params = _lora_params(model)
    return {n: tuple(params[n].shape) for n in lora_names(model)}


def trainable_lora_params(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters in :func:`lora_names` order (same objects as in the model)."""
    params = _lora_params(model)
    return [params[n] for n in lora_names(model)]


def get_lora_vector(model: nn.Module) -> np.ndarray:
    """The trainable LoRA parameters flattened into one float64 vector in :func:`lora_names` order."""
    ps = trainable_lora_params(model)
    if not ps:
        return np.zeros(0, dtype=np.float64)
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in ps]).numpy()


def set_lora_vector(model: nn.Module, vec: np.ndarray) -> None:
    """Write ``vec`` (layout of :func:`get_lora_vector`) into the trainable LoRA parameters.

    Raises ModelError if the length differs (a round state for another LoRA layout).
    """
    vec = np.asarray(vec, dtype=np.float64).reshape(-1)
    ps = trainable_lora_params(model)
    total = sum(p.numel() for p in ps)
    if vec.size != total:
        raise ModelError(
            f"LoRA vector has {vec.size} values but this model's trainable LoRA has {total}; the global "
            "state was made for another LoRA config (r, target modules, ffa) or another proxy"
        )
    off = 0
    with torch.no_grad():
        for p in ps:
            n = p.numel()
            p.copy_(torch.from_numpy(vec[off : off + n]).reshape(p.shape).to(p.dtype))
            off += n


def full_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA tensor (A and B, trainable or frozen) by stable name, detached copies."""
    return {n: p.detach().clone() for n, p in sorted(_lora_params(model).items())}


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Write a standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

    ``peft.PeftModel.from_pretrained(base, out_dir)`` reloads it, A included (frozen A is saved).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def merged_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """``(α/r)·B·A`` for every LoRA-wrapped module, keyed by the module's name in the base model.

    The tensor has the base weight's orientation (``(out, in)`` for nn.Linear, ``(in, out)`` for
    GPT-2's Conv1D), so ``W + ΔW`` is the merged weight.
    """
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and _ADAPTER in getattr(mod, "lora_A", {}):
            a = mod.lora_A[_ADAPTER].weight.detach()
            b = mod.lora_B[_ADAPTER].weight.detach()
            dw = (b @ a) * mod.scaling[_ADAPTER]
            if getattr(mod, "fan_in_fan_out", False):
                dw = dw.T
            key = stable_name(name + ".lora_A.x.weight").rsplit(".lora_A.", 1)[0]
            out[key] = dw.contiguous()
    return out
