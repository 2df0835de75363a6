"""A signed bundle of a tiny real proxy (llama, 2 blocks) and its keyset, for the operator-flow tests."""

from __future__ import annotations

import json
from pathlib import Path

from fedproxy_secure.artifacts import create_keyset, generate_key, issue_bundle, save_keyset
from fedproxy_secure.config import TinyModelSpec

TINY = TinyModelSpec(arch="llama", layers=2, hidden=32, heads=2, intermediate=64, vocab=259, max_positions=128)


def tiny_bundle(tmp: Path) -> tuple[Path, Path]:
    """``(bundle folder, keyset.json)``: a tiny Llama saved as a proxy folder, signed by a fresh key."""
    from fedproxy_secure.models.tiny import save_tiny_llm

    proxy = save_tiny_llm(TINY, tmp / "proxy")
    (proxy / "fedproxy.json").write_text(json.dumps({"base_model_hash": "sha256:" + "cd" * 32, "layer_map": [0, 1],
                                                    "n_layers_llm": 2, "n_layers_proxy": 2}))
    key = generate_key()
    ks = tmp / "keyset.json"
    save_keyset(create_keyset(key, name="test-fed"), ks)
    bundle = tmp / "bundle"
    issue_bundle(proxy, key, version=1, valid_days=30, out_dir=bundle)
    return bundle, ks


def write_yaml(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` and return it."""
    path.write_text(text)
    return path
