"""Users' own data: JSON Lines of ``{"prompt": str, "response": str}`` records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedproxy_secure.errors import DataError


@dataclass(frozen=True)
class PromptResponse:
    """A training pair; the loss is taken on the response tokens only."""

    prompt: str
    response: str


def iter_jsonl(path: Path):
    """Yield ``(line_number, record)`` for every non-blank line; DataError naming the line if not JSON."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def load_jsonl(path: str | Path, max_records: int | None = None) -> list[PromptResponse]:
    """Read prompt/response records; raise DataError naming the line of any malformed record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    out: list[PromptResponse] = []
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("response"), str):
            raise DataError(f"{path}:{lineno}: each line needs string fields 'prompt' and 'response'")
        out.append(PromptResponse(rec["prompt"], rec["response"]))
        if max_records and len(out) >= max_records:
            break
    if not out:
        raise DataError(f"{path}: no records; the file must hold at least one prompt/response line")
    return out
