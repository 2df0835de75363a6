"""Greedy decoding of one request, one token per :meth:`Decoding.step`, so a scheduler can interleave requests.

Works for the fused logit module and dense Hugging Face causal LMs (each request keeps its own KV
cache between steps). Guarantees of a finished :class:`Decoding`: the concatenation of every
``on_delta`` piece equals ``result.text``; the text ends before the earliest stop string
(``finish_reason`` ``stop``), at EOS (``stop``) or after ``max_new`` tokens (``length``); the tokens
are those of greedy decoding of the prompt alone, whatever other requests ran between its steps.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from fedproxy_secure.serving.errors import HTTPError
from fedproxy_secure.serving.prompting import cut_at_stop, safe_stream_prefix


def _cache_kw(model: Any) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def greedy_token_ids(model: Any, prompt_ids: list[int], max_new: int, eos: int | None) -> Iterator[int]:
    """Greedy next tokens of ``prompt_ids`` one at a time (KV cache kept between steps), stopping after
    ``max_new`` tokens or after yielding ``eos``. Works for the fused logit module and dense HF models."""
    import torch

    if not prompt_ids:
        raise HTTPError(400, "the prompt is empty after tokenisation", param="prompt")
    name = _cache_kw(model)
    step = torch.tensor([prompt_ids], dtype=torch.long)
    mask = torch.ones_like(step)
    cache = None
    with torch.no_grad():
        for _ in range(max_new):
            out = model(input_ids=step, attention_mask=mask, use_cache=True, **{name: cache})
            nxt = int(out.logits[0, -1].argmax())
            cache = getattr(out, name, None)
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            yield nxt
            if eos is not None and nxt == eos:
                return
            step = torch.tensor([[nxt]], dtype=torch.long)
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)


def prompt_token_ids(tokenizer: Any, prompt: str, lock: threading.Lock | None = None) -> list[int]:
    """The prompt's token ids (no special tokens added); ``lock`` serialises tokenizer use across threads."""
    with lock if lock is not None else contextlib.nullcontext():
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def check_context(model: Any, n_prompt: int, max_new: int) -> None:
    """400 naming ``max_tokens`` when the prompt plus ``max_new`` tokens exceed the model's context."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is None and hasattr(model, "llm"):
        limit = getattr(model.llm.config, "max_position_embeddings", None)
    if limit is not None and n_prompt + max_new > int(limit):
        raise HTTPError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_new}) exceeds the model's context of "
                             f"{int(limit)} tokens; shorten the prompt or lower max_tokens", param="max_tokens")


@dataclass
class Generation:
    """The outcome of one request: final text, why it ended, token counts."""

    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Decoding:
    """One request's greedy decoding, advanced by :meth:`step` (one model forward per call).

    ``step_tokens`` is what the last step processed (the whole prompt on the first step, then one
    token): what a fair scheduler charges the request's site.
    """

    def __init__(self, model: Any, tokenizer: Any, prompt_ids: list[int], max_new: int, stops: list[str],
                 on_delta: Callable[[str], None] | None = None, tok_lock: threading.Lock | None = None) -> None:
        if not prompt_ids:
            raise HTTPError(400, "the prompt is empty after tokenisation", param="prompt")
        self._tok, self._stops, self._on_delta = tokenizer, stops, on_delta
        self._tok_lock = tok_lock if tok_lock is not None else contextlib.nullcontext()
        self._eos = tokenizer.eos_token_id
        self._max_new = int(max_new)
        self._ids: Iterator[int] = greedy_token_ids(model, prompt_ids, self._max_new, self._eos)
        self._gen: list[int] = []
        self._sent = ""
        self.result = Generation(prompt_tokens=len(prompt_ids))
        self.finished = False
        self.step_tokens = 0
        self._first = True

    def _emit(self, text: str) -> None:
        if self._on_delta is not None and text.startswith(self._sent) and len(text) > len(self._sent):
            self._on_delta(text[len(self._sent):])
            self._sent = text

    def _decode(self) -> str:
        with self._tok_lock:
            return self._tok.decode(self._gen, skip_special_tokens=True)

    def _finish(self, text: str, reason: str) -> bool:
        self.result.text, self.result.finish_reason = text, reason
        self.result.completion_tokens = len(self._gen)
        self._emit(text)
        self.finished = True
        return True

    def step(self) -> bool:
        """Decode one more token; True once the request has finished (then ``result`` is final)."""
        if self.finished:
            return True
        self.step_tokens = self.result.prompt_tokens if self._first else 1
        self._first = False
        try:
            tok_id = next(self._ids)
        except StopIteration:
            return self._finish(cut_at_stop(self._decode(), self._stops)[0], "length")
        self._gen.append(tok_id)
        text, stopped = cut_at_stop(self._decode(), self._stops)
        if stopped or (self._eos is not None and tok_id == self._eos):
            return self._finish(text, "stop")
        if len(self._gen) >= self._max_new:
            return self._finish(text, "length")
        self._emit(safe_stream_prefix(text, self._stops))
        return False

    def run(self) -> Generation:
        """Step to the end (no interleaving) and return the result."""
        while not self.step():
            pass
        return self.result


def generate(model: Any, tokenizer: Any, prompt: str, max_new: int, stops: list[str],
             on_delta: Callable[[str], None] | None = None) -> Generation:
    """Greedy completion of ``prompt`` on its own (see the module docstring for the guarantees)."""
    ids = prompt_token_ids(tokenizer, prompt)
    check_context(model, len(ids), max_new)
    return Decoding(model, tokenizer, ids, max_new, stops, on_delta).run()
