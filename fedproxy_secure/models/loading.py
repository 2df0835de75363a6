"""Load any Hugging Face causal LM from a local folder (never from the hub)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from fedproxy_secure.errors import ModelError


def _check_causal_lm_folder(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"model folder {str(path)!r}: no config.json; give a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"model folder {str(path)!r}: config.json is not valid JSON ({exc})") from None
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        raise ModelError(
            f"model folder {str(path)!r}: architectures={archs} is not a causal language model "
            "(expected e.g. LlamaForCausalLM or GPT2LMHeadModel)"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"model folder {str(path)!r}: no *.safetensors weights (pickle formats are refused)")
    return cfg


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """Load a causal LM from a local folder with safetensors weights only; eval mode.

    Raises ModelError if the folder is not a causal LM. Never contacts the network.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    _check_causal_lm_folder(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, local_files_only=True
    )
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    """Load the tokenizer saved next to a model; pad token defaults to EOS; padding on the right."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def weights_hash(path: str | Path) -> str:
    """SHA-256 over the folder's safetensors files (sorted by name): a stable model identity."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()
