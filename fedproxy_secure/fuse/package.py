"""Write signed fused-model folders: ``logit`` (LLM + layer map + adapter) or dense (``weight`` / ``delta``).

Logit folder layout (every file covered by MANIFEST.json / MANIFEST.sig)::

    fused.json                      method, beta, layer map, what the proxy shares with the LLM, input hashes
    llm/                            the LLM as a dense HF folder (config, safetensors, tokenizer)
    proxy/config.json               the proxy's architecture (block count = len(layer map))
    proxy/own.safetensors           only the proxy tensors that differ from the LLM (distilled blocks); absent for exact copies
    adapter/adapter_config.json     the global LoRA (base path removed)
    adapter/adapter_model.safetensors

A dense folder is a plain HF folder (the fused LLM) plus ``fusion.json``, ``fused.json`` and the
manifest. No folder holds client data: only model, tokenizer, adapter, metadata and manifest files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedproxy_secure.errors import ConfigError, ModelError
from fedproxy_secure.fuse.record import FUSION_FILE, adapter_hash
from fedproxy_secure.fuse.signed import FUSED_META, sign_fused_folder
from fedproxy_secure.fuse.weight import read_proxy_mapping

FUSED_FORMAT_VERSION = "fedproxy-fused/1"
OWN_TENSORS = "proxy/own.safetensors"


def _check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {str(out)!r} exists and is not an empty folder; choose a new folder")
    return out


def _fresh_tmp(out: Path) -> Path:
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _publish(tmp: Path, out: Path) -> Path:
    if out.exists():
        out.rmdir()  # empty (checked before writing)
    tmp.rename(out)
    return out


def _atomic(out_dir: str | Path, write: Callable[[Path], Any]) -> Path:
    out = Path(out_dir)
    tmp = _fresh_tmp(out)
    try:
        write(tmp)
        return _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_adapter(adapter_dir: Path, dest: Path) -> None:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None  # a server path; not needed to load the adapter
    dest.mkdir(parents=True)
    (dest / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(adapter_dir / "adapter_model.safetensors", dest / "adapter_model.safetensors")


@dataclass
class LogitBuild:
    """The logit plug-in built in memory from folders, with what a fused folder records about it."""

    model: Any  # FusedLogitModel
    tokenizer: Any
    own: dict
    meta: dict


def build_logit_model(
    llm_dir: str | Path, proxy_dir: str | Path, adapter_dir: str | Path, *, beta: float = 1.0,
    source_round: int | None = None, aggregator: str | None = None,
) -> LogitBuild:
    """Build the logit plug-in (LLM + shared proxy + LoRA) in memory from the server's folders.

    Guarantees: the proxy is rebuilt from the LLM's tensors by the layer map plus only the tensors
    where it differs from the LLM (checked tensor by tensor, not trusted from ``fedproxy.json``),
    and the rebuilt proxy is checked bit for bit against the proxy folder; the adapter must be a
    safetensors LoRA that loads onto the proxy. Raises ConfigError/ModelError naming the input.
    """
    import torch
    from peft import PeftModel

    from fedproxy_secure.fuse.adapter import deltas_from_adapter
    from fedproxy_secure.fuse.served import FusedLogitModel, build_shared_proxy, differing_tensors
    from fedproxy_secure.models.loading import load_causal_lm, load_tokenizer, weights_hash

    if not (0.0 <= beta < float("inf")):
        raise ConfigError(f"--beta: {beta} must be a finite number >= 0")
    llm_dir, proxy_dir, adapter_dir = Path(llm_dir), Path(proxy_dir), Path(adapter_dir)
    mapping = read_proxy_mapping(proxy_dir)
    deltas_from_adapter(adapter_dir)  # refuses pickle, non-LoRA and incomplete adapters
    llm = load_causal_lm(llm_dir)
    tok = load_tokenizer(llm_dir)
    proxy = load_causal_lm(proxy_dir)
    own = differing_tensors(llm, proxy, mapping.layer_map)
    shared = build_shared_proxy(llm, proxy.config, mapping.layer_map, own)
    with torch.no_grad():  # the rebuilt proxy must be the proxy, bit for bit
        ref = proxy.state_dict()
        for name, t in shared.state_dict().items():
            if name in ref and not torch.equal(ref[name], t):
                raise ModelError(f"fusion: rebuilt proxy tensor {name!r} differs from the proxy folder's")
    try:
        tuned = PeftModel.from_pretrained(shared, str(adapter_dir), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"--lora: the adapter does not load onto the proxy ({exc}); was it trained on this proxy?") from None
    model = FusedLogitModel(llm, tuned, beta, tok)  # vocabulary and beta checks
    n_proxy = len({id(p) for p in proxy.parameters()})
    meta = {
        "format": FUSED_FORMAT_VERSION, "method": "logit", "beta": float(beta),
        "formula": "logits = z_llm + beta * (z_proxy_tuned - z_proxy_base)",
        "layer_map": list(mapping.layer_map), "distilled": mapping.distilled, "fusion_mode": mapping.fusion_mode,
        "proxy_shares_llm_blocks": not own, "proxy_own_tensors": sorted(own),
        "proxy_shared_tensors": n_proxy - len(own), "source_round": source_round, "aggregator": aggregator,
        "inputs": {"llm_weights_sha256": weights_hash(llm_dir), "proxy_weights_sha256": weights_hash(proxy_dir),
                   "adapter_sha256": adapter_hash(adapter_dir)},
        "created_unix": int(time.time()),
    }
    model.fused_meta = dict(meta)
    return LogitBuild(model, tok, own, meta)


def write_logit_folder(
    llm_dir: str | Path, proxy_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, key: Ed25519PrivateKey,
    *, beta: float = 1.0, source_round: int | None = None, aggregator: str | None = None,
) -> dict:
    """Write and sign a logit plug-in folder that :func:`fedproxy_secure.fuse.load_fused` serves; return ``fused.json``.

    Guarantees: everything :func:`build_logit_model` checks is checked before anything is written;
    the folder stores the LLM, the proxy's config and only its own (non-LLM) tensors, and the
    adapter; it appears complete and signed, or not at all.
    """
    from safetensors.torch import save_file

    proxy_dir, adapter_dir = Path(proxy_dir), Path(adapter_dir)
    _check_out(out_dir)
    b = build_logit_model(llm_dir, proxy_dir, adapter_dir, beta=beta, source_round=source_round, aggregator=aggregator)
    llm, tok, own, meta = b.model.llm, b.tokenizer, b.own, b.meta

    def write(tmp: Path) -> None:
        llm.save_pretrained(tmp / "llm", safe_serialization=True)
        tok.save_pretrained(tmp / "llm")
        (tmp / "proxy").mkdir()
        _proxy_config(proxy_dir).save_pretrained(tmp / "proxy")
        if own:
            save_file({k: v.contiguous() for k, v in own.items()}, str(tmp / OWN_TENSORS), metadata={"format": "pt"})
        _copy_adapter(adapter_dir, tmp / "adapter")
        (tmp / FUSED_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        sign_fused_folder(tmp, key, method="logit", base_model_hash=meta["inputs"]["llm_weights_sha256"])

    _atomic(out_dir, write)
    return meta


def _proxy_config(proxy_dir: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(proxy_dir), local_files_only=True, trust_remote_code=False)


def write_dense_folder(
    llm_dir: str | Path, proxy_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, key: Ed25519PrivateKey,
    *, method: str = "weight", scale: float = 1.0, source_round: int | None = None, aggregator: str | None = None,
) -> dict:
    """Write and sign a dense fused LLM (``W[l_j] += λ·ΔW_j``); return its ``fused.json``.

    ``weight`` accepts any proxy (for an exact copy this overwrites block l_j with the tuned block);
    ``delta`` requires a distilled proxy (``fedproxy.json`` says so) and adds only the LoRA delta.
    The folder is a plain HF model folder any stack loads, plus ``fusion.json``/``fused.json``/manifest.
    """
    from fedproxy_secure.fuse import fuse_folder
    from fedproxy_secure.models.loading import weights_hash

    if method not in ("weight", "delta"):
        raise ConfigError(f"--method: {method!r} is not a dense method (weight, delta)")
    _check_out(out_dir)
    mapping = read_proxy_mapping(proxy_dir)
    if method == "delta" and not (mapping.distilled or mapping.fusion_mode == "delta"):
        raise ConfigError("--method delta: the proxy's fedproxy.json says it was not distilled; build it with "
                          "`server compress --distill`, or use --method weight / logit for an exact-copy proxy")
    rec: dict = {}

    def write(tmp: Path) -> None:
        rec.update(fuse_folder(llm_dir, proxy_dir, adapter_dir, tmp, scale=scale, source_round=source_round,
                               aggregator=aggregator, method=method))
        meta = {"format": FUSED_FORMAT_VERSION, **rec, "method": method, "record": FUSION_FILE}
        (tmp / FUSED_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        sign_fused_folder(tmp, key, method=method, base_model_hash=weights_hash(llm_dir))
        rec.clear()
        rec.update(meta)

    _atomic(out_dir, write)
    return rec


def write_distil_lora_folder(
    llm_dir: str | Path, proxy_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, key: Ed25519PrivateKey,
    server_texts: list[str], *, beta: float = 1.0, steps: int = 200, lr: float = 1e-4, rank: int = 8,
    max_length: int = 256, seed: int = 0, source_round: int | None = None, aggregator: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Distil the logit plug-in into a LoRA on the LLM (server text only), merge it, write + sign a dense folder.

    Guarantees: only ``server_texts`` (the operator's own text, e.g. the calibration corpus) are
    used, split (seeded) into training and held-out parts; ``fused.json`` records the held-out
    KL(teacher || LLM) and KL(teacher || student) and a hash of the texts, never the texts.
    """
    from fedproxy_secure.compress.calib import calib_hash
    from fedproxy_secure.fuse.distil_lora import distil_into_lora, split_server_texts
    from fedproxy_secure.models.loading import weights_hash

    _check_out(out_dir)
    train, heldout = split_server_texts(server_texts, seed=seed)
    b = build_logit_model(llm_dir, proxy_dir, adapter_dir, beta=beta, source_round=source_round, aggregator=aggregator)
    dense, stats = distil_into_lora(b.model, b.model.llm, b.tokenizer, train, heldout, steps=steps, lr=lr, r=rank,
                                    alpha=2.0 * rank, max_length=max_length, seed=seed, on_step=on_step)
    meta = {
        "format": FUSED_FORMAT_VERSION, "method": "distil-lora",
        "teacher": {k: b.meta[k] for k in ("formula", "beta", "layer_map", "distilled", "inputs")},
        "distil": stats, "server_texts_sha256": calib_hash(server_texts),
        "source_round": source_round, "aggregator": aggregator, "created_unix": int(time.time()),
    }

    def write(tmp: Path) -> None:
        dense.save_pretrained(tmp, safe_serialization=True)
        b.tokenizer.save_pretrained(tmp)
        (tmp / FUSED_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        sign_fused_folder(tmp, key, method="distil-lora", base_model_hash=weights_hash(llm_dir))

    _atomic(out_dir, write)
    return meta
