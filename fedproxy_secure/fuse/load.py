"""Load a signed fused-model folder: verify first, then parse only the private copy of the verified bytes.

:func:`load_fused` serves ``logit`` folders as one :class:`~fedproxy_secure.fuse.served.FusedLogitModel`;
:func:`load_fused_model` is the single entry point for every method (dense folders load as a plain
HF causal LM). Both refuse a folder whose signature does not verify against the pinned keyset,
whose files differ from the manifest, or which asks for remote code, before any model file is parsed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from fedproxy_secure.artifacts.keyset import Keyset, load_keyset
from fedproxy_secure.errors import ModelError, SecurityError
from fedproxy_secure.fuse.package import OWN_TENSORS
from fedproxy_secure.fuse.signed import FUSED_META, VerifiedFused, verify_fused_folder

_HF = {"use_safetensors": True, "local_files_only": True, "trust_remote_code": False}


class LogitFolderMeta(BaseModel):
    """The fields of a logit folder's ``fused.json`` the loader relies on (others are kept as a record)."""

    model_config = ConfigDict(extra="allow")
    method: Literal["logit"]
    beta: float = Field(ge=0.0, allow_inf_nan=False)
    layer_map: list[int] = Field(min_length=1)
    proxy_own_tensors: list[str] = Field(default_factory=list)


def parse_logit_meta(meta: Any) -> LogitFolderMeta:
    """Validate a logit folder's ``fused.json``; ModelError naming the field otherwise."""
    try:
        return LogitFolderMeta.model_validate(meta)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "(root)"
        raise ModelError(f"fused folder: {FUSED_META} field {field!r}: {err['msg']}; rewrite it with `server fuse`") from None


def _keyset(keyset: Keyset | str | Path) -> Keyset:
    return keyset if isinstance(keyset, Keyset) else load_keyset(keyset)


def _no_remote_code(cfg_path: Path) -> None:
    cfg = json.loads(cfg_path.read_bytes())
    if not isinstance(cfg, dict) or "auto_map" in cfg:
        raise SecurityError(f"{cfg_path.parent.name}/config.json asks for remote code (auto_map) or is not an object; refused")


def _causal_lm(folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    _no_remote_code(folder / "config.json")
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), **_HF).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"verified fused folder: {folder.name} does not load as a causal LM: {exc}") from None


def _tokenizer(folder: Path) -> Any:
    from fedproxy_secure.models.loading import load_tokenizer

    try:
        return load_tokenizer(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"verified fused folder: unloadable tokenizer: {exc}") from None


def _load_logit(root: Path, meta: dict) -> nn.Module:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from fedproxy_secure.fuse.served import FusedLogitModel, build_shared_proxy

    m = parse_logit_meta(meta)
    llm = _causal_lm(root / "llm")
    _no_remote_code(root / "proxy" / "config.json")
    pcfg = AutoConfig.from_pretrained(str(root / "proxy"), local_files_only=True, trust_remote_code=False)
    own = load_file(str(root / OWN_TENSORS)) if (root / OWN_TENSORS).is_file() else {}
    if sorted(own) != sorted(m.proxy_own_tensors):
        raise ModelError("fused folder: proxy/own.safetensors does not hold the tensors fused.json lists")
    proxy = build_shared_proxy(llm, pcfg, m.layer_map, own)
    try:
        tuned = PeftModel.from_pretrained(proxy, str(root / "adapter"), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"fused folder: the adapter does not load onto the proxy: {exc}") from None
    return FusedLogitModel(llm, tuned, m.beta, _tokenizer(root / "llm"), meta)


def _verified(folder: str | Path, keyset: Keyset | str | Path, now: datetime | None,
              private: Path) -> tuple[VerifiedFused, dict]:
    vf = verify_fused_folder(folder, _keyset(keyset), copy_to=private, now=now)
    try:
        meta = json.loads((private / FUSED_META).read_bytes())
    except ValueError:
        raise SecurityError(f"{FUSED_META} is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("method") != vf.manifest.method:
        raise SecurityError(f"{FUSED_META} method differs from the signed manifest's {vf.manifest.method!r}")
    return vf, meta


def load_fused_model(folder: str | Path, keyset: Keyset | str | Path, *, now: datetime | None = None) -> nn.Module:
    """Verify ``folder`` against ``keyset`` (a Keyset or a keyset.json path), then load it for inference.

    Returns a module whose ``forward(input_ids, attention_mask)`` returns ``.logits``: a
    :class:`FusedLogitModel` for ``logit`` folders, the dense HF causal LM for ``weight``/``delta``/
    ``distil-lora``. ``.tokenizer`` and ``.fused_meta`` are set on both. Guarantees: nothing is parsed
    unless the signature (fused-model domain) and every file hash verified; only the private copy
    of the verified bytes is parsed; no remote code runs. SecurityError if refused.
    """
    return _load(folder, keyset, now, logit_only=False)


def _load(folder: str | Path, keyset: Keyset | str | Path, now: datetime | None, *, logit_only: bool) -> nn.Module:
    private = Path(tempfile.mkdtemp(prefix="fedproxy-fused-"))
    try:
        vf, meta = _verified(folder, keyset, now, private)
        if logit_only and vf.manifest.method != "logit":
            raise ModelError(f"{folder}: a dense fused folder (method {vf.manifest.method!r}); "
                             "load it with fedproxy_secure.fuse.load_fused_model or any HF stack")
        if vf.manifest.method == "logit":
            return _load_logit(private, meta)
        model = _causal_lm(private)
        model.tokenizer, model.fused_meta = _tokenizer(private), meta
        return model
    finally:
        shutil.rmtree(private, ignore_errors=True)


def load_fused(folder: str | Path, keyset: Keyset | str | Path, *, now: datetime | None = None) -> nn.Module:
    """Verify and load a ``logit`` fused folder as ONE module (see :func:`load_fused_model`).

    Raises ModelError for a dense folder (load it with :func:`load_fused_model` or any HF stack).
    """
    return _load(folder, keyset, now, logit_only=True)


def generate_text(model: nn.Module, prompt: str, *, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` decoded with the folder's tokenizer (fused or dense model)."""
    import torch

    from fedproxy_secure.fuse.served import FusedLogitModel

    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ModelError("generate_text: the model has no tokenizer; load it with load_fused_model")
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    if isinstance(model, FusedLogitModel):
        out = model.generate(ids, max_new_tokens=max_new_tokens)
    else:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
