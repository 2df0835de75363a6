"""Load any Hugging Face causal LM from a local folder (never from the hub), optionally spread over
GPU, CPU and disk with accelerate when it does not fit one device (:class:`Placement`)."""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedproxy_secure.errors import ConfigError, ModelError


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


DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class Placement:
    """Where a big model's weights go: ``device`` cpu | cuda | auto (accelerate's ``device_map``),
    ``max_memory`` per device (accelerate keys: ``"cpu"``, GPU index ``0``, ...; values in bytes or
    strings such as ``"2GiB"``) and ``offload_dir`` for weights that fit nowhere (disk offload)."""

    device: str = "cpu"
    max_memory: dict[int | str, int | str] | None = None
    offload_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"--device: {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu or auto")
        if self.device != "auto" and (self.max_memory or self.offload_dir):
            raise ConfigError("--max-memory/--offload-dir: only with --device auto (accelerate big-model loading)")

    @property
    def sharded(self) -> bool:
        """True when accelerate places the weights (``device_map="auto"``)."""
        return self.device == "auto"


_PLACEMENT: ContextVar[Placement | None] = ContextVar("fedproxy_placement", default=None)


@contextmanager
def placement(p: Placement):
    """Make ``p`` the placement of every :func:`load_causal_lm` call (without its own) inside the block."""
    token = _PLACEMENT.set(p)
    try:
        yield p
    finally:
        _PLACEMENT.reset(token)


def parse_max_memory(text: str | None) -> dict[int | str, int | str] | None:
    """Parse ``--max-memory`` text ``"cpu=2GiB,0=20GiB"`` into accelerate's ``max_memory`` dict.

    Keys: ``cpu``, ``disk`` or a GPU index; values as accelerate reads them (``"500MB"``, ``"2GiB"``
    or a byte count). Raises ConfigError naming the option on any malformed entry.
    """
    if not text:
        return None
    out: dict[int | str, int | str] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"--max-memory: {part!r} must look like cpu=2GiB or 0=20GiB")
        if not (key in ("cpu", "disk") or key.isdigit()):
            raise ConfigError(f"--max-memory: device {key!r} must be cpu, disk or a GPU index")
        if not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", value, flags=re.IGNORECASE):
            raise ConfigError(f"--max-memory: size {value!r} must be bytes or like 500MB / 2GiB")
        out[int(key) if key.isdigit() else key] = int(value) if value.isdigit() else value
    return out


def load_causal_lm(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    *,
    place: Placement | None = None,
) -> nn.Module:
    """Load a causal LM from a local folder with safetensors weights only; eval mode.

    ``place`` (or the enclosing :func:`placement` block) overrides ``device``: with
    ``Placement(device="auto", max_memory=..., offload_dir=...)`` accelerate spreads the weights
    over GPUs, CPU and disk (``device_map="auto"``) and moves each block in for its forward pass,
    so a model larger than any one device still runs (same outputs, slower).
    Raises ModelError if the folder is not a causal LM. Never contacts the network.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    _check_causal_lm_folder(path)
    place = place or _PLACEMENT.get()
    if place is not None and place.sharded:
        kwargs: dict = {"device_map": "auto"}
        if place.max_memory:
            kwargs["max_memory"] = dict(place.max_memory)
        if place.offload_dir is not None:
            Path(place.offload_dir).mkdir(parents=True, exist_ok=True)
            kwargs["offload_folder"] = str(place.offload_dir)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, local_files_only=True, **kwargs
        )
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, local_files_only=True
    )
    return model.to(place.device if place is not None else device).eval()


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
