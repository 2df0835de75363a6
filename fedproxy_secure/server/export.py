"""``server export --round N --out DIR``: the global LoRA of a finished round as a standard PEFT adapter.

Writes ``DIR/proxy`` (the verified proxy from the federation's bundle: the exact bytes whose hashes the
signed manifest lists), ``DIR/adapter`` (``adapter_config.json`` + ``adapter_model.safetensors``,
``base_model_name_or_path`` = the absolute path of ``DIR/proxy``) and ``DIR/export.json`` (round,
state hash, bundle id, A seed, vector size). ``peft.AutoPeftModelForCausalLM.from_pretrained(DIR/adapter)``
loads proxy + adapter; ``server fuse --proxy DIR/proxy --lora DIR/adapter`` plugs it into the LLM.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fedproxy_secure.errors import ConfigError
from fedproxy_secure.server.setup import deployment, load_settings, server_paths


def pick_round(rounds: list, wanted: int | None) -> int:
    """The round to export: ``wanted`` if it finished (status done), else the last finished round.

    ``rounds`` are store rows (``round_id``, ``status``). Raises ConfigError naming ``--round``.
    """
    done = [r.round_id for r in rounds if r.status == "done"]
    if not done:
        raise ConfigError("--round: no round of this federation has finished yet; nothing to export")
    if wanted is None:
        return done[-1]
    if wanted not in done:
        raise ConfigError(f"--round {wanted}: not a finished round; finished rounds: {done}")
    return wanted


def save_adapter_on_proxy(peft_model, adapter_dir: str | os.PathLike, proxy_dir: str | os.PathLike) -> Path:
    """Save ``peft_model``'s adapter to ``adapter_dir`` with ``base_model_name_or_path`` = absolute ``proxy_dir``.

    Guarantees: ``peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` loads the proxy folder
    ``proxy_dir`` (which the caller writes) with this adapter; returns ``adapter_dir``.
    """
    from fedproxy_secure.lora import save_adapter

    adapter_dir = Path(adapter_dir)
    save_adapter(peft_model, adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    acfg = json.loads(cfg_path.read_text())
    acfg["base_model_name_or_path"] = str(Path(proxy_dir).resolve())
    cfg_path.write_text(json.dumps(acfg, indent=2))
    return adapter_dir


def export_round(d: str | os.PathLike, out: str | os.PathLike, round_id: int | None = None) -> dict:
    """Write proxy + PEFT adapter of the global state after ``round_id`` (default: the last finished round).

    Guarantees: the proxy is re-verified against the federation's pinned keyset while it is copied;
    the adapter is built with the federation's stored LoRA config and A seed, so its B matrices are
    exactly the stored global vector (ModelError if the sizes differ). ``out`` must be new or empty.
    Returns the ``export.json`` record.
    """
    from fedproxy_secure.artifacts import load_keyset, verify_bundle
    from fedproxy_secure.config import LoraConfig
    from fedproxy_secure.lora import attach_lora, set_lora_vector
    from fedproxy_secure.models.loading import load_causal_lm
    from fedproxy_secure.server.rounds import state_from_bytes
    from fedproxy_secure.server.store import SQLiteStore

    p = server_paths(d)
    dep = deployment(d)
    if not dep or not p["bundle"].is_dir():
        raise ConfigError(f"{p['dir']} was made without a proxy bundle; export needs 'server init --bundle' "
                          "(the adapter is only meaningful on its proxy)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} exists and is not an empty folder; choose a new folder")
    settings = load_settings(d)
    store = SQLiteStore(p["db"])
    try:
        rid = pick_round(store.rounds(), round_id)
        gs = store.global_state(rid)
    finally:
        store.close()
    if gs is None or gs[0] != rid:
        raise ConfigError(f"--round {rid}: the store holds no global state for it")
    blob = gs[1]
    theta = state_from_bytes(blob)["theta"]
    proxy_dir, adapter_dir = out / "proxy", out / "adapter"
    proxy_dir.mkdir(parents=True)
    vb = verify_bundle(p["bundle"], load_keyset(p["keyset"]), copy_to=proxy_dir)
    model = load_causal_lm(proxy_dir)
    lora = LoraConfig.model_validate((settings.train or {}).get("lora") or dep.get("lora") or {})
    pm = attach_lora(model, lora, int(settings.a_seed))
    set_lora_vector(pm, theta)
    save_adapter_on_proxy(pm, adapter_dir, proxy_dir)
    rec = {"round": rid, "state_sha256": hashlib.sha256(blob).hexdigest(), "lora_dim": int(theta.size),
           "a_seed": int(settings.a_seed), "lora": lora.model_dump(mode="json"), "aggregator": settings.aggregator,
           "bundle_id": vb.bundle_id, "bundle_version": vb.version, "proxy": str(proxy_dir.resolve()),
           "adapter": str(adapter_dir.resolve())}
    (out / "export.json").write_text(json.dumps(rec, indent=2))
    return rec
