"""Stage iii, server only: plug the global LoRA trained on the proxy into the LLM.

- weight plug-in: :func:`fuse_weights` (``W[l_j] += s_j·(α/r)·B_j·A_j``), :func:`fuse_folder` for
  folders (dense HF output + ``fusion.json``);
- logit plug-in (proxy-tuning): :func:`logit_plugin_fn`;
- per-block scales fitted on server text: :func:`calibrate_block_scales`;
- Offsite-Tuning adapters: :mod:`fedproxy_secure.fuse.offsite`;
- servable, signed fused folders: :func:`write_logit_folder` / :func:`write_dense_folder` write them,
  :func:`load_fused` (logit) and :func:`load_fused_model` (any method) verify and load them.
"""

from __future__ import annotations

from pathlib import Path

from fedproxy_secure.fuse.adapter import deltas_from_adapter, deltas_from_peft_model, lora_deltas
from fedproxy_secure.fuse.calibrate import CalibrationResult, calibrate_block_scales
from fedproxy_secure.fuse.logit import generate_greedy, logit_plugin_fn
from fedproxy_secure.fuse.record import FUSION_FILE, adapter_hash, save_fused
from fedproxy_secure.fuse.weight import ProxyMapping, fuse_weights, read_proxy_mapping
from fedproxy_secure.fuse.load import generate_text, load_fused, load_fused_model
from fedproxy_secure.fuse.package import write_dense_folder, write_logit_folder
from fedproxy_secure.fuse.served import FusedLogitModel, parameter_bytes

__all__ = [
    "CalibrationResult", "FUSION_FILE", "FusedLogitModel", "generate_text", "load_fused", "load_fused_model",
    "parameter_bytes", "write_dense_folder", "write_logit_folder", "ProxyMapping", "adapter_hash", "calibrate_block_scales",
    "deltas_from_adapter", "deltas_from_peft_model", "fuse_folder", "fuse_weights", "generate_greedy",
    "logit_plugin_fn", "lora_deltas", "read_proxy_mapping", "save_fused",
]


def fuse_folder(
    llm_dir: str | Path, proxy_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *,
    scale: float = 1.0, source_round: int | None = None, aggregator: str | None = None, method: str = "weight",
) -> dict:
    """Weight plug-in from folders: LLM (server-side path) + proxy (layer map) + PEFT adapter -> dense LLM.

    Reads safetensors only; checks every mapping before writing; returns the ``fusion.json`` record.
    """
    import json

    from fedproxy_secure.models.loading import load_causal_lm, load_tokenizer, weights_hash

    mapping = read_proxy_mapping(proxy_dir)
    deltas = deltas_from_adapter(adapter_dir)
    llm = load_causal_lm(llm_dir)
    fused = fuse_weights(llm, mapping, deltas, scale=scale, inplace=True)
    out = save_fused(
        fused, load_tokenizer(llm_dir), out_dir, layer_map=mapping.layer_map, scale=scale,
        llm_hash=weights_hash(llm_dir), proxy_hash=weights_hash(proxy_dir), adapter_sha256=adapter_hash(adapter_dir),
        source_round=source_round, aggregator=aggregator, method=method,
        extra={"fusion_mode": mapping.fusion_mode, "distilled": mapping.distilled, "modules_fused": len(deltas)},
    )
    return json.loads((Path(out) / FUSION_FILE).read_text())
