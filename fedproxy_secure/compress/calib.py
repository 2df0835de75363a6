"""Server calibration text: a folder of .txt files, a .jsonl file, or BIG-bench task files.

Calibration (and distillation) text is the *server's* data; never point this at client data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from fedproxy_secure.data.jsonl import iter_jsonl
from fedproxy_secure.errors import DataError


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _from_jsonl(path: Path) -> list[str]:
    out = []
    for lineno, rec in iter_jsonl(path):
        text = rec.get("text", rec.get("prompt")) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: each line needs a string field 'text' or 'prompt'")
        out.append(text)
    return out


def _is_bigbench(path: Path) -> bool:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("examples"), list)


def _from_bigbench(files: Sequence[Path]) -> list[str]:
    """Prompts (``MCExample.prompt``) of each task, interleaved round-robin across tasks."""
    from fedproxy_secure.data.bigbench import load_task

    per_task = [[ex.prompt for ex in load_task(f.parent, f.stem).examples] for f in files]
    out, i = [], 0
    while any(i < len(p) for p in per_task):
        out += [p[i] for p in per_task if i < len(p)]
        i += 1
    return out


def calib_texts_from(path: str | Path, *, limit: int) -> list[str]:
    """Up to ``limit`` non-empty calibration texts from ``path``, in a deterministic order.

    Accepts: a ``.jsonl`` file (field ``text`` or ``prompt`` per line); a ``.txt`` file or a folder of
    ``.txt`` files (split into paragraphs at blank lines); a BIG-bench task ``.json`` file or a folder of
    them (the rendered prompts, interleaved across tasks). Raises DataError if nothing usable is found.
    """
    p = Path(path)
    if limit < 1:
        raise DataError(f"--calib: limit {limit} must be >= 1")
    if not p.exists():
        raise DataError(f"--calib: {str(p)!r} does not exist; give a folder of .txt, a .jsonl or BIG-bench task files")
    if p.is_file():
        if p.suffix == ".jsonl":
            texts = _from_jsonl(p)
        elif p.suffix == ".json":
            if not _is_bigbench(p):
                raise DataError(f"--calib: {p} is not a BIG-bench task file (needs an 'examples' list)")
            texts = _from_bigbench([p])
        else:
            texts = _paragraphs(p.read_text(encoding="utf-8", errors="replace"))
    else:
        txt = sorted(p.rglob("*.txt"))
        jsonl = sorted(p.glob("*.jsonl"))
        tasks = sorted(f for f in list(p.glob("*.json")) + list(p.glob("*/task.json")) if _is_bigbench(f))
        texts = []
        for f in txt:
            texts += _paragraphs(f.read_text(encoding="utf-8", errors="replace"))
        for f in jsonl:
            texts += _from_jsonl(f)
        if tasks:
            texts += _from_bigbench(tasks)
    texts = [t for t in texts if t.strip()][:limit]
    if not texts:
        raise DataError(f"--calib: {str(p)!r} holds no calibration text (empty files, or no .txt/.jsonl/BIG-bench .json)")
    return texts


def calib_hash(texts: Sequence[str]) -> str:
    """SHA-256 of the texts as a canonical JSON list: identifies the calibration set in fedproxy.json."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()
