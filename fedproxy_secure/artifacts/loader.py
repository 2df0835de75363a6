"""The client's only way to load a proxy model: verify first, then parse the verified bytes.

TOCTOU defence: :func:`load_verified_proxy` makes a private folder (mode 0700, via
``tempfile.mkdtemp``), and :func:`verify_bundle` copies every file into it *from the same bytes it
hashes*. transformers then parses only that private copy, so changing the bundle folder after (or
during) verification cannot change what is loaded. The copy is deleted once the model is in memory.
Loading uses ``use_safetensors=True``, ``local_files_only=True`` and ``trust_remote_code=False``;
a config asking for remote code (``auto_map``) is refused outright.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from fedproxy_secure.errors import ModelError, SecurityError

from .bundle import VerifiedBundle, verify_bundle
from .keyset import Keyset

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

__all__ = ["load_verified_proxy", "LoadedProxy"]


class LoadedProxy(tuple):
    """``(model, tokenizer)`` with the :class:`VerifiedBundle` attached as ``.bundle``."""

    bundle: VerifiedBundle

    def __new__(cls, model: Any, tokenizer: Any, bundle: VerifiedBundle) -> "LoadedProxy":
        obj = super().__new__(cls, (model, tokenizer))
        obj.bundle = bundle
        return obj


def load_verified_proxy(
    bundle_dir: str | Path,
    keyset: Keyset,
    state_dir: str | Path,
    *,
    now: datetime | None = None,
    torch_dtype: Any = None,
) -> LoadedProxy:
    """Verify ``bundle_dir`` against the pinned ``keyset`` (with anti-rollback state in ``state_dir``),
    then load ``(model, tokenizer)`` from a private copy of the verified bytes.

    Guarantees: nothing in the bundle is parsed by transformers/tokenizers unless every check of
    :func:`verify_bundle` passed; only safetensors weights are loaded; no remote code runs. The
    tokenizer is None if the bundle has no tokenizer files. Raises SecurityError (bundle refused) or
    ModelError (verified bundle that transformers cannot load).
    """
    private = Path(tempfile.mkdtemp(prefix="fedproxy-verified-"))  # mode 0700
    try:
        vb = verify_bundle(bundle_dir, keyset, now=now, state_dir=state_dir, copy_to=private)
        cfg = json.loads((private / "config.json").read_bytes())
        if not isinstance(cfg, dict):
            raise SecurityError("config.json is not a JSON object")
        if "auto_map" in cfg:
            raise SecurityError("config.json asks for remote code (auto_map); refused")

        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True, "trust_remote_code": False}
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        try:
            model = AutoModelForCausalLM.from_pretrained(str(private), **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"verified bundle {bundle_dir} cannot be loaded as a causal LM: {exc}") from None
        tokenizer = None
        if any((private / name).is_file() for name in TOKENIZER_FILES):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(private), local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelError(f"verified bundle {bundle_dir} has an unloadable tokenizer: {exc}") from None
        return LoadedProxy(model, tokenizer, vb)
    finally:
        shutil.rmtree(private, ignore_errors=True)
