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
    """Wrap a HF causal LM as a logits function (``fn.model`` keeps the model for prefix-shared scoring)."""

    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).logits

    fn.model = model  # type: ignore[attr-defined]
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


def _choice_sequences(tokenizer, examples: Sequence[MCExample], max_length: int):
    """``(pairs, enc, order)``: every (example, choice) pair, its :func:`tokenize_pair` encoding, and the
    pair indices longest first (length-sorted batches pad less)."""
    pairs = [(i, c) for i, ex in enumerate(examples) for c in range(len(ex.choices))]
    enc = [tokenize_pair(tokenizer, examples[i].prompt, examples[i].choices[c], max_length) for i, c in pairs]
    return pairs, enc, sorted(range(len(enc)), key=lambda k: -len(enc[k][0]))


def right_padded(seqs: Sequence[Sequence[int]], pad: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of shape ``(len(seqs), width)``: each sequence left-aligned, ``pad`` after it, mask 1 on its tokens."""
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def score_choices(
    logits_fn: LogitsFn, tokenizer, examples: Sequence[MCExample], *, batch_size: int = 16,
    max_length: int = 512, device: str | torch.device = "cpu", normalize: bool = False,
) -> list[list[float]]:
    """Sum (or mean if ``normalize``) log-probability of each choice's tokens, per example.

    When ``logits_fn`` wraps a plain HF model (:func:`model_logits_fn`) or carries ``parts`` (a list
    of ``(model, weight)`` whose weighted logits it sums), each example's prompt is run once per
    model and its key/value cache shared by all choices on a CPU (:func:`score_choices_shared`,
    several times fewer tokens), and on an accelerator many examples go in one batch
    (:func:`score_choices_batched`); both give the same scores up to float rounding. Any other
    scorer gets one sequence per choice.
    """
    parts = getattr(logits_fn, "parts", None) or (
        [(logits_fn.model, 1.0)] if getattr(logits_fn, "model", None) is not None else None)
    if parts is not None and torch.device(device).type != "cpu":
        return score_choices_batched(parts, tokenizer, examples, max_length=max_length, device=device,
                                     normalize=normalize)
    if parts is not None:
        return score_choices_shared(parts, tokenizer, examples, max_length=max_length, device=device,
                                    normalize=normalize)
    return score_choices_full(logits_fn, tokenizer, examples, batch_size=batch_size, max_length=max_length,
                              device=device, normalize=normalize)


@torch.no_grad()
def score_choices_batched(model: torch.nn.Module | Sequence[tuple[torch.nn.Module, float]], tokenizer,
                          examples: Sequence[MCExample], *, max_length: int = 512,
                          device: str | torch.device = "cpu", normalize: bool = False,
                          max_tokens: int = 8192) -> list[list[float]]:
    """:func:`score_choices` for accelerators: every (example, choice) sequence of many examples in one batch.

    Sequences are length-sorted and right-padded into batches of at most ``max_tokens`` padded
    tokens; only the answer tokens' log-probabilities leave the device. ``model`` is a HF causal LM
    or a list of ``(model, weight)`` parts scored as ``sum(weight * logits)``. Guarantees: the tokens
    scored and the positions they are predicted from are those of :func:`tokenize_pair`, so the
    result equals :func:`score_choices_shared` up to float rounding (right padding never changes
    the logits of the real tokens of a causal model).
    """
    parts = [(model, 1.0)] if isinstance(model, torch.nn.Module) else list(model)
    pairs, enc, order = _choice_sequences(tokenizer, examples, max_length)
    scores = [[0.0] * len(ex.choices) for ex in examples]
    pad = tokenizer.pad_token_id or 0
    start = 0
    while start < len(order):
        width = len(enc[order[start]][0])  # the longest in this batch (sorted descending)
        rows = max(1, max_tokens // max(1, width))
        chunk = order[start : start + rows]
        start += len(chunk)
        ids, mask = right_padded([enc[k][0] for k in chunk], pad, width)
        ids, mask = ids.to(device), mask.to(device)
        z = None
        for m, w in parts:
            zi = w * m(input_ids=ids, attention_mask=mask).logits.float()
            z = zi if z is None else z + zi
        # positions pos-1 predict token pos for every answer token; gather them, then normalise only those rows
        rix, pix, tgt, owner = [], [], [], []
        for row, k in enumerate(chunk):
            seq, rstart, _ = enc[k]
            for pos in range(rstart, len(seq)):
                rix.append(row)
                pix.append(pos - 1)
                tgt.append(seq[pos])
                owner.append(k)
        if not rix:
            continue
        sel = z[torch.tensor(rix, device=z.device), torch.tensor(pix, device=z.device)]
        lp = torch.log_softmax(sel, dim=-1).gather(1, torch.tensor(tgt, device=z.device)[:, None]).squeeze(1)
        lp = lp.double().cpu().tolist()
        per: dict[int, list[float]] = {}
        for k, v in zip(owner, lp):
            per.setdefault(k, []).append(v)
        for k, vals in per.items():
            i, c = pairs[k]
            t = torch.tensor(vals, dtype=torch.float64)
            scores[i][c] = float(t.mean() if normalize else t.sum())
    return scores


@torch.no_grad()
def score_choices_shared(model: torch.nn.Module | Sequence[tuple[torch.nn.Module, float]], tokenizer,
                         examples: Sequence[MCExample], *, max_length: int = 512,
                         device: str | torch.device = "cpu", normalize: bool = False) -> list[list[float]]:
    """:func:`score_choices` for a HF causal LM, running each example's shared prefix once.

    ``model`` may also be a list of ``(model, weight)`` parts scored as ``sum(weight * logits)``
    (the logit plug-in: ``[(llm, 1), (tuned, beta), (base, -beta)]``). Guarantees: the tokens scored
    and the positions they are predicted from are those of :func:`tokenize_pair` for every choice
    (the prefix is the longest run shared by all choices, up to the first response token), so the
    result equals the one-sequence-per-choice scores.
    """
    parts = [(model, 1.0)] if isinstance(model, torch.nn.Module) else list(model)

    def combined(**kw) -> tuple[torch.Tensor, list]:
        z, caches = None, []
        for m, w in parts:
            res = m(**kw) if not kw.get("past_key_values") else m(**{**kw, "past_key_values": kw["past_key_values"][len(caches)]})
            zi = w * res.logits.float()
            z = zi if z is None else z + zi
            caches.append(res.past_key_values)
        return z, caches

    def full_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return combined(input_ids=ids, attention_mask=mask)[0]

    out: list[list[float]] = []
    for ex in examples:
        enc = [tokenize_pair(tokenizer, ex.prompt, c, max_length) for c in ex.choices]
        seqs = [e[0] for e in enc]
        q = min(e[1] for e in enc)  # every choice's response starts at or after q
        while q > 0 and any(s[:q] != seqs[0][:q] for s in seqs[1:]):
            q -= 1
        if q == 0:  # choices truncated the prompt differently: nothing to share, score one sequence each
            out += score_choices_full(full_fn, tokenizer, [ex], batch_size=len(ex.choices),
                                      max_length=max_length, device=device, normalize=normalize)
            continue
        pre = torch.tensor([seqs[0][:q]], dtype=torch.long, device=device)
        z_pre, caches = combined(input_ids=pre, attention_mask=torch.ones_like(pre), use_cache=True, logits_to_keep=1)
        last = torch.log_softmax(z_pre[0, -1], dim=-1).cpu()
        tails = [s[q:] for s in seqs]
        width = max(len(t) for t in tails)
        scores = []
        if width:
            n = len(seqs)
            ids = torch.zeros((n, width), dtype=torch.long)
            mask = torch.zeros((n, q + width), dtype=torch.long)
            mask[:, :q] = 1
            for r, t in enumerate(tails):
                ids[r, : len(t)] = torch.tensor(t, dtype=torch.long)
                mask[r, q : q + len(t)] = 1
            for cache in caches:
                cache.batch_repeat_interleave(n)
            pos_ids = torch.arange(q, q + width, dtype=torch.long).expand(n, width)
            z_tail, _ = combined(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=caches,
                                 position_ids=pos_ids.to(device), use_cache=True)
            logp = torch.log_softmax(z_tail, dim=-1).cpu()
        for r, (seq, rstart, _) in enumerate(enc):
            lps = []
            for pos in range(rstart, len(seq)):  # token seq[pos] is predicted at position pos - 1
                row = last if pos - 1 == q - 1 else logp[r, pos - 1 - q]
                lps.append(float(row[seq[pos]]))
            t = torch.tensor(lps, dtype=torch.float64)
            scores.append(float(t.mean() if normalize else t.sum()) if len(lps) else 0.0)
        out.append(scores)
    return out


@torch.no_grad()
def score_choices_full(
    logits_fn: LogitsFn, tokenizer, examples: Sequence[MCExample], *, batch_size: int = 16,
    max_length: int = 512, device: str | torch.device = "cpu", normalize: bool = False,
) -> list[list[float]]:
    """:func:`score_choices` with one padded sequence per (example, choice), for any logits function."""
    pairs, enc, order = _choice_sequences(tokenizer, examples, max_length)
    scores = [[0.0] * len(ex.choices) for ex in examples]
    pad = tokenizer.pad_token_id or 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(enc[k][0]) for k in chunk)
        ids, mask = right_padded([enc[k][0] for k in chunk], pad, width)
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
