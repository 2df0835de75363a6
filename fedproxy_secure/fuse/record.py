"""Write a fused LLM as a plain dense HF folder (safetensors) with a ``fusion.json`` record."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from fedproxy_secure.errors import ModelError
from fedproxy_secure.models.loading import weights_hash

FUSION_FILE = "fusion.json"


def adapter_hash(adapter_dir: str | Path) -> str:
    """SHA-256 over ``adapter_config.json`` and ``adapter_model.safetensors`` (name + bytes)."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        h.update(name.encode() + b"\0" + (Path(adapter_dir) / name).read_bytes())
    return h.hexdigest()


def save_fused(
    model: nn.Module, tokenizer, out_dir: str | Path, *, layer_map: Sequence[int], scale: Any,
    llm_hash: str, proxy_hash: str | None, adapter_sha256: str | None, source_round: int | None = None,
    aggregator: str | None = None, method: str = "weight", extra: dict | None = None,
) -> Path:
    """Save the dense fused model + tokenizer and ``fusion.json``; refuse a non-empty ``out_dir``.

    ``fusion.json`` records the source round, aggregator, layer map, scale, method and the hashes
    of the inputs (LLM, proxy, adapter) and of the written weights.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"--out: {str(out)!r} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    rec = {
        "method": method, "source_round": source_round, "aggregator": aggregator,
        "layer_map": list(layer_map), "scale": scale,
        "inputs": {"llm_weights_sha256": llm_hash, "proxy_weights_sha256": proxy_hash, "adapter_sha256": adapter_sha256},
        "fused_weights_sha256": weights_hash(out), "created_unix": int(time.time()),
    } | (extra or {})
    (out / FUSION_FILE).write_text(json.dumps(rec, indent=2))
    return out
