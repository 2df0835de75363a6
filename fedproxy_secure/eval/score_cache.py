"""Option scores computed once per (model fingerprint, prompt format, task, example id).

The zero-shot LLM and the untuned proxy score every test example the same way for every method
and seed, so the benchmarks keep their option scores in an append-only JSONL file and only score
what is missing. The fingerprint must name everything that changes a score (weights hash, max
length, normalisation); the caller builds it with :func:`fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

from fedproxy_secure.eval.multiple_choice import LogitsFn, score_choices


def fingerprint(*parts: object) -> str:
    """A short stable id of ``parts`` (SHA-256 of their JSON, first 16 hex digits)."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


class ScoreCache:
    """Option scores keyed by ``(fingerprint, prompt_format, task, example_id)``; persisted when ``path`` is set.

    Guarantees: a cached entry is returned only for the exact key and the same number of options;
    scores are appended to the file as they are computed (a killed run keeps what it scored).
    """

    def __init__(self, path: str | Path | None = None, log: Callable[[str], None] = print):
        self.path = Path(path) if path else None
        self.log = log
        self._d: dict[tuple[str, str, str, int], list[float]] = {}
        self.hits = self.misses = 0
        if self.path and self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self._d[tuple(r["key"])] = r["scores"]

    def scores(self, fp: str, prompt_format: str, logits_fn: LogitsFn, tokenizer, examples: Sequence, *,
               batch_size: int = 16, max_length: int = 512, device: str = "cpu", label: str = "", chunk: int = 32) -> list[list[float]]:
        """Scores of ``examples`` (each with ``task``/``uid``/``choices``) in order, computing only the missing ones."""
        keys = [(fp, prompt_format, ex.task, int(ex.uid)) for ex in examples]
        missing = [i for i, (k, ex) in enumerate(zip(keys, examples))
                   if k not in self._d or len(self._d[k]) != len(ex.choices)]
        self.hits += len(examples) - len(missing)
        self.misses += len(missing)
        t0, done = time.perf_counter(), 0
        for start in range(0, len(missing), chunk):  # scored and appended chunk by chunk: a killed run keeps them
            part = missing[start : start + chunk]
            new = score_choices(logits_fn, tokenizer, [examples[i] for i in part], batch_size=batch_size,
                                max_length=max_length, device=device)
            lines = []
            for i, s in zip(part, new):
                self._d[keys[i]] = s
                lines.append(json.dumps({"key": list(keys[i]), "scores": s}))
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as f:
                    f.write("\n".join(lines) + "\n")
            done += len(part)
            dt = time.perf_counter() - t0
            self.log(f"scored {done}/{len(missing)} examples{' (' + label + ')' if label else ''} in {dt:.1f} s: "
                     f"{done / max(dt, 1e-9):.2f} examples/s")
        return [list(self._d[k]) for k in keys]


def timed_scores(logits_fn: LogitsFn, tokenizer, examples: Sequence, *, log: Callable[[str], None] = print,
                 label: str = "", **kw) -> list[list[float]]:
    """Uncached :func:`score_choices` that logs examples/s (for tuned models, scored once each)."""
    t0 = time.perf_counter()
    out = score_choices(logits_fn, tokenizer, examples, **kw)
    dt = time.perf_counter() - t0
    log(f"scored {len(examples)} examples{' (' + label + ')' if label else ''} in {dt:.1f} s: "
        f"{len(examples) / max(dt, 1e-9):.1f} examples/s")
    return out
