"""Tokenised training batches with answer-only labels (same prompt/response boundary as evaluation)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from fedproxy_secure.errors import DataError
from fedproxy_secure.eval import tokenize_pair

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """One example: token ids and labels (``IGNORE`` on prompt tokens)."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass
class EncodedSet:
    """A tokenised dataset and what happened to the raw examples."""

    items: list[Encoded]
    truncated: int
    dropped_no_answer: int


def context_limit(model, max_length: int) -> int:
    """``max_length`` capped at the model's context (max_position_embeddings / n_positions) if known."""
    cfg = getattr(model, "config", None)
    ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(int(max_length), int(ctx)) if ctx else int(max_length)


def encode_examples(tokenizer, examples: Sequence, max_length: int) -> EncodedSet:
    """Tokenise prompt/response pairs with :func:`tokenize_pair`; the loss covers response tokens only.

    Pairs longer than ``max_length`` lose prompt tokens from the left (counted in ``truncated`` and
    warned about once); pairs with no response token are dropped (counted). Raises DataError if
    ``examples`` is empty or nothing is left.
    """
    if len(examples) == 0:
        raise DataError("training data: the dataset is empty; give at least one prompt/response example")
    items, truncated, dropped = [], 0, 0
    for ex in examples:
        ids, start, cut = tokenize_pair(tokenizer, ex.prompt, ex.response, max_length)
        truncated += int(cut)
        start = max(start, 1)  # the first token has no prediction
        if start >= len(ids):
            dropped += 1
            continue
        labels = [IGNORE] * start + list(ids[start:])
        items.append(Encoded(tuple(ids), tuple(labels)))
    if truncated:
        warnings.warn(f"training data: {truncated} of {len(examples)} examples exceed max_length={max_length} "
                      "tokens; their prompts were cut from the left", stacklevel=2)
    if not items:
        raise DataError(f"training data: none of {len(examples)} examples has a response token to learn; "
                        "check that 'response' fields are non-empty")
    return EncodedSet(items, truncated, dropped)


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE on padding)."""
    width = max(len(e.ids) for e in items)
    ids = torch.full((len(items), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_batches(items: Sequence[Encoded], batch_size: int, pad_id: int, *, generator: torch.Generator | None = None,
                 shuffle: bool = True) -> list[dict[str, torch.Tensor]]:
    """One epoch of fixed-size batches (last one smaller), shuffled with ``generator`` if asked."""
    order = torch.randperm(len(items), generator=generator).tolist() if shuffle else list(range(len(items)))
    return [collate([items[i] for i in order[s : s + batch_size]], pad_id) for s in range(0, len(order), batch_size)]


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's labelled (answer) tokens, shape ``(B,)``."""
    return _mean_answer_ce(logits[:, :-1, :], labels[:, 1:])


def _mean_answer_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row mean cross-entropy of ``logits`` (B, T, V) against ``targets`` (B, T) over non-IGNORE targets."""
    tok = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    valid = (targets != IGNORE).to(tok.dtype)
    return (tok * valid).sum(1) / valid.sum(1).clamp(min=1.0)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions ``p`` whose next token ``labels[:, p + 1]`` is an answer token in at least one row (sorted)."""
    return torch.nonzero((labels[:, 1:] != IGNORE).any(0)).flatten()


def answer_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """:func:`per_example_loss` of ``model`` on ``batch``, with the LM head run only where an answer token is
    predicted (``logits_to_keep`` = :func:`answer_positions`), shape ``(B,)``.

    Guarantees: the same value as ``per_example_loss(model(...).logits, labels)`` up to float rounding
    (every position whose prediction is scored is kept), with logits memory proportional to the answer
    positions instead of the sequence length. A model whose forward has no ``logits_to_keep`` gets the
    full computation.
    """
    labels = batch["labels"]
    pos = answer_positions(labels)
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    logits_to_keep=pos.to(batch["input_ids"].device))
    except TypeError:  # no logits_to_keep in this architecture's forward
        return per_example_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                labels)
    logits = out.logits
    if logits.shape[1] != len(pos):  # the model ignored the argument: score the full sequence
        return per_example_loss(logits, labels)
    return _mean_answer_ce(logits, labels[:, 1:][:, pos.to(labels.device)])
