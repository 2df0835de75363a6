"""Write and read a proxy folder: config.json, model.safetensors, tokenizer files, fedproxy.json."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from fedproxy_secure.errors import ConfigError, ModelError

META_FILE = "fedproxy.json"
META_FORMAT = "fedproxy-proxy/1"


def save_proxy(proxy, tokenizer, out_dir: str | Path, *, base_model_hash: str) -> Path:
    """Write ``proxy`` (a CompressedProxy) as a Hugging Face folder plus ``fedproxy.json``; return the path.

    Guarantees: safetensors only; ``out_dir`` must not exist or be empty (ConfigError otherwise); the
    folder appears complete or not at all (written to a temporary sibling, then renamed).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {str(out)!r} exists and is not an empty folder; choose a new output folder")
    if not isinstance(base_model_hash, str) or not base_model_hash:
        raise ConfigError("save_proxy: base_model_hash must be a non-empty string (weights_hash of the LLM folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        proxy.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = dict(proxy.meta, base_model_hash=base_model_hash)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if not any(tmp.glob("*.safetensors")):
            raise ModelError("save_proxy: the model did not write safetensors weights")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    proxy.meta["base_model_hash"] = base_model_hash
    return out


def load_proxy_meta(proxy_dir: str | Path) -> dict:
    """Read ``fedproxy.json`` of a proxy folder; raise ModelError if missing or malformed.

    The one reader of a proxy folder's ``fedproxy.json`` (fusion reads its layer map through it).
    Issuing and verifying a signed bundle (``artifacts.bundle``) check its ``base_model_hash``
    through the bundle's own size-bounded, symlink-refusing file access (on verification, the very
    bytes that were hashed); that is part of the bundle check, not another reader of proxy folders."""
    path = Path(proxy_dir) / META_FILE
    if not path.is_file():
        raise ModelError(f"proxy {str(proxy_dir)!r}: no {META_FILE}; build the proxy with `server compress`")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("layer_map"), list):
        raise ModelError(f"{path}: no 'layer_map' list (proxy block j -> LLM block); rebuild the proxy")
    return meta
