"""The LLM folder's tokenizer, checked before any compression work.

A proxy is written with the LLM's tokenizer (clients train on it), so a model folder without one
is refused up front with a one-line error instead of a transformers traceback after the model
has been loaded.
"""

from __future__ import annotations

from pathlib import Path

from fedproxy_secure.errors import ModelError

#: files that hold a tokenizer's vocabulary (any one is enough for ``AutoTokenizer``)
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
               "sentencepiece.bpe.model")

_FIX = ("copy the tokenizer files of the same model (e.g. tokenizer.json and tokenizer_config.json) into the folder, "
        "or write them with tokenizer.save_pretrained(folder)")


def has_tokenizer_files(folder: str | Path) -> bool:
    """True when ``folder`` holds at least one tokenizer vocabulary file (:data:`VOCAB_FILES` or ``*.tiktoken``)."""
    folder = Path(folder)
    return any((folder / f).is_file() for f in VOCAB_FILES) or any(folder.glob("*.tiktoken"))


def check_llm_folder(folder: str | Path, option: str = "--llm") -> None:
    """Refuse, before any weights or tokenizer are loaded, an LLM folder that cannot be compressed.

    Guarantees, each a one-line ``ModelError`` naming ``option``, the folder and the fix: the folder is
    a causal-LM Hugging Face folder (config.json, causal architecture, safetensors weights; checked
    first so that error wins) and it holds a tokenizer vocabulary file (:data:`VOCAB_FILES`).
    """
    from fedproxy_secure.models.loading import _check_causal_lm_folder  # JSON/file checks only, no weights read

    folder = Path(folder)
    _check_causal_lm_folder(folder)
    if not has_tokenizer_files(folder):
        raise ModelError(f"{option}: model folder {str(folder)!r} has no tokenizer (none of "
                         f"{', '.join(VOCAB_FILES)}); {_FIX}")


def load_llm_tokenizer(folder: str | Path, option: str = "--llm"):
    """The tokenizer of the model folder ``folder``, or ``ModelError`` naming ``option``, the folder and the fix.

    Guarantees: never a transformers traceback; a folder with no vocabulary file is refused without
    calling transformers at all; any failure to load is one line (capped at 300 characters).
    """
    from fedproxy_secure.models import load_tokenizer

    folder = Path(folder)
    if not has_tokenizer_files(folder):
        raise ModelError(f"{option}: model folder {str(folder)!r} has no tokenizer (none of "
                         f"{', '.join(VOCAB_FILES)}); {_FIX}")
    try:
        return load_tokenizer(folder)
    except Exception as exc:  # transformers raises ValueError/OSError/TypeError/... for broken tokenizer files
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise ModelError(f"{option}: the tokenizer in {str(folder)!r} cannot be loaded ({why}); {_FIX}") from None
