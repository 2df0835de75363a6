"""Shared helpers for tests/test_artifacts_*.py: a tiny fake proxy folder, keys and bundles."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from fedproxy_secure.artifacts import create_keyset, generate_key, issue_bundle
from fedproxy_secure.artifacts.keys import MANIFEST_DOMAIN, sign

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
BASE_HASH = "sha256:" + "ab" * 32


def make_proxy(folder: Path) -> Path:
    """A tiny proxy folder: config.json, model.safetensors, tokenizer.json, fedproxy.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    rng = np.random.default_rng(0)
    save_file({"w": rng.standard_normal((8, 4)).astype(np.float32)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}))
    (folder / "fedproxy.json").write_text(json.dumps({"base_model_hash": BASE_HASH, "lora_targets": ["q_proj"]}))
    return folder


class Env:
    """A keyset with one key, a proxy folder and helpers to issue bundles."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.key = generate_key()
        self.keyset = create_keyset(self.key, name="test-deploy", valid_days=365, now=NOW)
        self.proxy = make_proxy(tmp / "proxy")
        self.state = tmp / "state"
        self._n = 0

    def issue(self, version: int = 1, key=None, **kw) -> Path:
        self._n += 1
        out = self.tmp / f"bundle{self._n}"
        kw.setdefault("now", NOW)
        issue_bundle(self.proxy, key or self.key, version=version, valid_days=30, out_dir=out, **kw)
        return out


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def resign(bundle: Path, key, manifest_bytes: bytes) -> None:
    """Replace MANIFEST.json with ``manifest_bytes`` and sign it with ``key`` (a malicious or careless signer)."""
    (bundle / "MANIFEST.json").write_bytes(manifest_bytes)
    (bundle / "MANIFEST.sig").write_bytes(sign(key, MANIFEST_DOMAIN, manifest_bytes))
