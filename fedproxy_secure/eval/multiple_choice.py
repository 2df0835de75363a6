"""Multiple-choice accuracy by log-likelihood of each choice's text after the prompt.

The scorer is any ``logits_fn(input_ids, attention_mask) -> logits`` so the same evaluator serves
a plain model, the logit plug-in (proxy-tuning) and the fused LLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from fedproxy_secure.data.bigbench import MCExample

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Wrap a HF causal LM as a logits function."""

    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).logits

    return fn


def tokenize_pair(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], int, bool]:
    """Token ids of prompt+response and the index where the response starts.

    The prompt is cut from the left when the pair exceeds ``max_length`` (the response is kept whole
    when possible). Returns ``(ids, response_start, truncated)``.
    """
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    truncated = len(p) + len(r) > max_length
    if truncated:
        r = r[: max_length - 1]
        p = p[len(p) - (max_length - len(r)) :] if max_length - len(r) > 0 else p[-1:]
    return p + r, len(p), truncated


@torch.no_grad()
def score_choices(
    logits_fn: LogitsFn, tokenizer, examples: Sequence[MCExample], *, batch_size: int = 16,
    max_length: int = 512, device: str | torch.device = "cpu", normalize: bool = False,
) -> list[list[float]]:
    """Sum (or mean if ``normalize``) log-probability of each choice's tokens, per example."""
    pairs = [(i, c) for i, ex in enumerate(examples) for c in range(len(ex.choices))]
    enc = [tokenize_pair(tokenizer, examples[i].prompt, examples[i].choices[c], max_length) for i, c in pairs]
    order = sorted(range(len(enc)), key=lambda k: -len(enc[k][0]))  # length-sorted batches pad less
    scores = [[0.0] * len(ex.choices) for ex in examples]
    pad = tokenizer.pad_token_id or 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(enc[k][0]) for k in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, k in enumerate(chunk):
            seq = enc[k][0]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logp = torch.log_softmax(logits_fn(ids.to(device), mask.to(device)).float(), dim=-1).cpu()
        for row, k in enumerate(chunk):
            seq, rstart, _ = enc[k]
            targets = torch.tensor(seq[rstart:])
            lp = logp[row, rstart - 1 : len(seq) - 1].gather(1, targets[:, None]).squeeze(1)
            i, c = pairs[k]
            scores[i][c] = float(lp.mean() if normalize else lp.sum())
    return scores


@dataclass
class EvalResult:
    """Accuracy per task and their unweighted mean (BIG-bench multiple_choice_grade)."""

    per_task: dict[str, float] = field(default_factory=dict)
    n_per_task: dict[str, int] = field(default_factory=dict)

    @property
    def mean_accuracy(self) -> float:
        return sum(self.per_task.values()) / len(self.per_task) if self.per_task else 0.0

    def to_dict(self) -> dict:
        return {"mean_accuracy": self.mean_accuracy, "per_task": dict(self.per_task), "n_per_task": dict(self.n_per_task)}


def evaluate_tasks(
    logits_fn: LogitsFn, tokenizer, test_sets: Mapping[str, Sequence[MCExample]], *,
    batch_size: int = 16, max_length: int = 512, device: str | torch.device = "cpu",
) -> EvalResult:
    """Accuracy on each task's test set: the argmax-likelihood choice must be the answer."""
    res = EvalResult()
    for name, exs in test_sets.items():
        sc = score_choices(logits_fn, tokenizer, exs, batch_size=batch_size, max_length=max_length, device=device)
        correct = sum(int(max(range(len(s)), key=s.__getitem__) == ex.answer) for s, ex in zip(sc, exs))
        res.per_task[name] = correct / len(exs) if exs else 0.0
        res.n_per_task[name] = len(exs)
    return res
