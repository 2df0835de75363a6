"""Offsite-Tuning plug-in (arXiv 2302.04870): adapters trained on the emulator go back into the LLM.

The emulator keeps the LLM's first/last ``n`` blocks verbatim as trainable adapters and a
compressed middle that stays frozen. Plug-in writes the trained adapters (as LoRA deltas or as
whole trained blocks) back into the LLM's own first/last ``n`` blocks; the middle is discarded.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping, Sequence

import torch
from torch import nn

from fedproxy_secure.errors import ModelError
from fedproxy_secure.fuse.weight import ProxyMapping, fuse_weights
from fedproxy_secure.models.blocks import decoder_blocks


def emulator_layer_map(n_llm_blocks: int, keep_ratio: float = 0.5, n_adapt: int = 2) -> list[int]:
    """OT emulator layer map: first/last ``n_adapt`` blocks + uniformly spaced middle blocks."""
    if n_llm_blocks < 2 * n_adapt + 1:
        raise ModelError(f"offsite: the LLM has {n_llm_blocks} blocks, too few for 2x{n_adapt} adapter blocks")
    k = n_llm_blocks - math.floor(n_llm_blocks * (1 - keep_ratio))
    mid = list(range(n_adapt, n_llm_blocks - n_adapt))
    m = max(k - 2 * n_adapt, 0)
    picked = sorted({mid[round(i * (len(mid) - 1) / max(m - 1, 1))] for i in range(m)})
    return list(range(n_adapt)) + picked + list(range(n_llm_blocks - n_adapt, n_llm_blocks))


def adapter_blocks(layer_map: Sequence[int], n_adapt: int) -> list[int]:
    """Emulator block indices of the adapters (first/last ``n_adapt``)."""
    k = len(layer_map)
    return list(range(n_adapt)) + list(range(k - n_adapt, k))


def plug_offsite_deltas(
    llm: nn.Module, layer_map: Sequence[int], deltas: Mapping[str, torch.Tensor], n_adapt: int = 2,
) -> nn.Module:
    """Add LoRA deltas trained on the emulator's adapter blocks to the LLM's matching blocks (a copy).

    Raises ModelError if a delta touches a non-adapter (frozen, compressed) emulator block or if the
    adapters are not the LLM's first/last ``n_adapt`` blocks.
    """
    lm = list(layer_map)
    n_llm = len(decoder_blocks(llm)[1])
    ad = adapter_blocks(lm, n_adapt)
    if [lm[j] for j in ad] != list(range(n_adapt)) + list(range(n_llm - n_adapt, n_llm)):
        raise ModelError(f"offsite: layer map {lm} does not keep the LLM's first/last {n_adapt} blocks as adapters")
    path = decoder_blocks(llm)[0]
    for name in deltas:
        j = int(name.split(path + ".", 1)[1].split(".", 1)[0]) if path + "." in name else -1
        if j not in ad:
            raise ModelError(f"offsite: delta {name!r} is not on an adapter block {ad}; OT trains adapters only")
    return fuse_weights(llm, ProxyMapping(tuple(lm), "overwrite"), deltas)


def plug_offsite_blocks(llm: nn.Module, emulator: nn.Module, layer_map: Sequence[int], n_adapt: int = 2) -> nn.Module:
    """Copy the emulator's trained adapter blocks (full parameters) into the LLM's first/last blocks (a copy)."""
    out = copy.deepcopy(llm)
    _, lb, _ = decoder_blocks(out)
    _, eb, _ = decoder_blocks(emulator)
    if len(eb) != len(layer_map):
        raise ModelError(f"offsite: emulator has {len(eb)} blocks but the layer map {len(layer_map)}")
    for j in adapter_blocks(layer_map, n_adapt):
        lb[layer_map[j]].load_state_dict(eb[j].state_dict())
    return out
