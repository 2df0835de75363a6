"""Weight plug-in: write the merged LoRA deltas of the proxy's blocks into the LLM's blocks.

For every targeted proxy matrix ``W_j`` the merged update is ``ΔW_j = (α/r)·B_j·A_j``. The LLM
receives ``W_llm[l_j] += s_j · ΔW_j`` where ``l_j`` is proxy block ``j``'s source block in the
LLM (the proxy's layer map) and ``s_j`` a scale (1.0 by default). For an exact-copy proxy with
scale 1 this equals overwriting block ``l_j`` with the merged proxy block; for a distilled proxy
only the delta is added. Dropped blocks, embeddings, final norm and LM head are never touched.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from fedproxy_secure.compress.proxy_io import load_proxy_meta
from fedproxy_secure.errors import ModelError
from fedproxy_secure.models.blocks import decoder_blocks

Scale = float | Sequence[float] | Mapping[int, float]


@dataclass(frozen=True)
class ProxyMapping:
    """What fusion needs from a proxy: its layer map and how its blocks relate to the LLM's."""

    layer_map: tuple[int, ...]
    fusion_mode: str = "overwrite"  # "overwrite" (exact copy) or "delta" (distilled / modified)
    distilled: bool = False

    @classmethod
    def coerce(cls, obj: "ProxyMapping | Mapping | Sequence[int]") -> "ProxyMapping":
        """Accept a ProxyMapping, a meta mapping with ``layer_map`` (e.g. fedproxy.json) or a plain list."""
        if isinstance(obj, ProxyMapping):
            return obj
        if isinstance(obj, Mapping):
            if "layer_map" not in obj:
                raise ModelError("proxy meta: no 'layer_map' (proxy block j -> LLM block l_j); rebuild the proxy")
            return cls(tuple(int(x) for x in obj["layer_map"]), str(obj.get("fusion_mode", "overwrite")),
                       bool(obj.get("distilled", False)))
        if hasattr(obj, "layer_map"):  # e.g. a compress.ProxyMeta dataclass
            return cls(tuple(int(x) for x in obj.layer_map), str(getattr(obj, "fusion_mode", "overwrite")),
                       bool(getattr(obj, "distilled", False)))
        return cls(tuple(int(x) for x in obj))


def read_proxy_mapping(proxy_dir: str | Path) -> ProxyMapping:
    """The mapping of a proxy folder, from its ``fedproxy.json`` as the one reader,
    :func:`fedproxy_secure.compress.proxy_io.load_proxy_meta`, reads it (ModelError if missing or
    malformed)."""
    return ProxyMapping.coerce(load_proxy_meta(proxy_dir))


def _split_block_name(name: str, block_path: str, n_blocks: int) -> tuple[int, str]:
    m = re.fullmatch(re.escape(block_path) + r"\.(\d+)\.(.+)", name)
    if m is None:
        raise ModelError(
            f"fusion: LoRA module {name!r} is not inside a decoder block ({block_path}.N.*); only block "
            "matrices can be fused (embeddings, norm and head are never changed)"
        )
    j = int(m.group(1))
    if j >= n_blocks:
        raise ModelError(f"fusion: LoRA module {name!r} names proxy block {j} but the layer map has {n_blocks} blocks")
    return j, m.group(2)


def _scale_for(scale: Scale, j: int) -> float:
    if isinstance(scale, (int, float)):
        return float(scale)
    if isinstance(scale, Mapping):
        return float(scale.get(j, 1.0))
    return float(scale[j])


def fuse_weights(
    llm: nn.Module, proxy: "ProxyMapping | Mapping | Sequence[int]", deltas: Mapping[str, torch.Tensor],
    *, scale: Scale = 1.0, inplace: bool = False,
) -> nn.Module:
    """Return the LLM with ``W[l_j].<sub> += s_j·ΔW`` for every proxy delta ``...layers.j.<sub>``.

    Guarantees: the input LLM is unchanged unless ``inplace``; only the matrices named by ``deltas``
    (mapped through the layer map) change; with all-zero deltas the result is bit-identical to the
    input. Raises ModelError (before changing anything) if the layer map points outside the LLM, a
    delta names a module the LLM lacks, or a delta's shape differs from the LLM matrix.
    """
    mapping = ProxyMapping.coerce(proxy)
    block_path, blocks, _ = decoder_blocks(llm)
    n_llm = len(blocks)
    lm = mapping.layer_map
    if not lm:
        raise ModelError("fusion: empty layer map")
    bad = [l for l in lm if not 0 <= l < n_llm]
    if bad:
        raise ModelError(f"fusion: layer map {list(lm)} points outside the LLM's {n_llm} blocks (bad: {bad}); wrong LLM for this proxy?")
    if len(set(lm)) != len(lm):
        raise ModelError(f"fusion: layer map {list(lm)} repeats an LLM block")
    if not isinstance(scale, (int, float)):
        idx = scale.keys() if isinstance(scale, Mapping) else range(len(scale))
        if not isinstance(scale, Mapping) and len(scale) != len(lm):
            raise ModelError(f"fusion: {len(scale)} per-block scales for {len(lm)} proxy blocks")
        if any(not 0 <= int(k) < len(lm) for k in idx):
            raise ModelError("fusion: per-block scale names a proxy block outside the layer map")
    params = dict(llm.named_parameters())
    plan = []
    for name, d in deltas.items():
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        # accept names with or without a PEFT prefix
        for prefix in ("base_model.model.",):
            if base.startswith(prefix):
                base = base[len(prefix):]
        j, sub = _split_block_name(base, block_path, len(lm))
        target = f"{block_path}.{lm[j]}.{sub}.weight"
        if target not in params:
            raise ModelError(f"fusion: LoRA module {name!r} maps to {target!r}, which the LLM does not have (different architecture?)")
        if tuple(params[target].shape) != tuple(d.shape):
            raise ModelError(f"fusion: delta for {name!r} has shape {tuple(d.shape)}, LLM {target} has {tuple(params[target].shape)}")
        if not torch.isfinite(d).all():
            raise ModelError(f"fusion: delta for {name!r} has NaN/Inf")
        plan.append((target, d, _scale_for(scale, j)))
    out = llm if inplace else copy.deepcopy(llm)
    out_params = dict(out.named_parameters())
    with torch.no_grad():
        for target, d, s in plan:
            if s == 0.0 or not bool(d.any()):
                continue
            p = out_params[target]
            p.add_(d.to(device=p.device, dtype=torch.float32).mul(s).to(p.dtype))
    return out
