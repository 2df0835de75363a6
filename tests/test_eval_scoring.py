"""Prefix-shared option scoring equals one-sequence-per-choice scoring; the score cache computes once."""

from __future__ import annotations

from pathlib import Path

import torch

from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.data import MCExample, load_task
from fedproxy_secure.eval import ScoreCache, model_logits_fn, score_choices
from fedproxy_secure.eval.multiple_choice import score_choices_full
from fedproxy_secure.models import build_tiny_model, byte_tokenizer

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "bigbench-mini"


def _model():
    torch.manual_seed(0)
    return build_tiny_model(TinyModelSpec(layers=2, hidden=32, heads=2, intermediate=64, vocab=259)).eval()


def test_shared_prefix_scores_equal_full_scores() -> None:
    model, tok = _model(), byte_tokenizer()
    exs = [*load_task(DATA, "social_support", prompt_format="reference").examples[:3],
           *load_task(DATA, "navigate", prompt_format="bigbench").examples[:3],
           MCExample("Q: pick\\nA:", (" a", " ab", " abc d"), 2, "t", 0)]
    fn = model_logits_fn(model)
    full = score_choices_full(fn, tok, exs, batch_size=4, max_length=64)
    shared = score_choices(fn, tok, exs, max_length=64)
    for a, b in zip(full, shared):
        assert len(a) == len(b)
        assert all(abs(x - y) < 1e-3 for x, y in zip(a, b)), (a, b)
    # truncation from the left (long prompt, max_length 24) gives the same scores too
    assert all(abs(x - y) < 1e-3 for a, b in zip(score_choices_full(fn, tok, exs[:2], max_length=24),
                                                   score_choices(fn, tok, exs[:2], max_length=24)) for x, y in zip(a, b))


def test_score_cache_scores_once_and_persists(tmp_path: Path) -> None:
    model, tok = _model(), byte_tokenizer()
    exs = list(load_task(DATA, "navigate", prompt_format="reference").examples[:4])
    calls = []

    def fn(ids, mask):
        calls.append(ids.shape[0])
        return model(input_ids=ids, attention_mask=mask).logits

    cache = ScoreCache(tmp_path / "c.jsonl", log=lambda m: None)
    first = cache.scores("fp", "reference", fn, tok, exs, max_length=64)
    n_calls = len(calls)
    again = ScoreCache(tmp_path / "c.jsonl", log=lambda m: None).scores("fp", "reference", fn, tok, exs, max_length=64)
    assert again == first and len(calls) == n_calls  # read back from the file, nothing recomputed
    other = cache.scores("fp2", "reference", fn, tok, exs[:1], max_length=64)  # another fingerprint is scored
    assert len(calls) > n_calls and other == first[:1]


def test_shared_prefix_scoring_of_a_weighted_logit_sum() -> None:
    from fedproxy_secure.fuse.logit import logit_plugin_fn

    llm, tok = _model(), byte_tokenizer()
    torch.manual_seed(1)
    tuned = build_tiny_model(TinyModelSpec(layers=2, hidden=32, heads=2, intermediate=64, vocab=259)).eval()
    base = build_tiny_model(TinyModelSpec(layers=2, hidden=32, heads=2, intermediate=64, vocab=259)).eval()
    fn = logit_plugin_fn(llm, tuned, base, beta=0.7)
    exs = list(load_task(DATA, "social_support", prompt_format="reference").examples[:3])
    full = score_choices_full(fn, tok, exs, max_length=64)
    fn.parts = [(llm, 1.0), (tuned, 0.7), (base, -0.7)]
    shared = score_choices(fn, tok, exs, max_length=64)
    assert all(abs(x - y) < 1e-3 for a, b in zip(full, shared) for x, y in zip(a, b)), (full, shared)


def test_batched_scores_equal_shared_prefix_scores() -> None:
    """The accelerator path (many examples per padded batch) scores exactly what the CPU path scores,
    for a plain model and for the weighted logit sum, with batches small enough to split the work."""
    from fedproxy_secure.eval.multiple_choice import score_choices_batched, score_choices_shared

    llm, tok = _model(), byte_tokenizer()
    torch.manual_seed(1)
    tuned = build_tiny_model(TinyModelSpec(layers=2, hidden=32, heads=2, intermediate=64, vocab=259)).eval()
    exs = [*load_task(DATA, "social_support", prompt_format="reference").examples[:3],
           *load_task(DATA, "navigate", prompt_format="bigbench").examples[:3],
           MCExample("Q: pick\\nA:", (" a", " ab", " abc d"), 2, "t", 0)]
    for parts in ([(llm, 1.0)], [(llm, 1.0), (tuned, 0.7), (llm, -0.7)]):
        shared = score_choices_shared(parts, tok, exs, max_length=64)
        batched = score_choices_batched(parts, tok, exs, max_length=64, max_tokens=150)
        assert [len(s) for s in batched] == [len(ex.choices) for ex in exs]
        assert all(abs(x - y) < 1e-3 for a, b in zip(shared, batched) for x, y in zip(a, b)), (shared, batched)
    # left-truncated long prompts and length normalisation agree as well
    a = score_choices_shared(llm, tok, exs[:2], max_length=24, normalize=True)
    b = score_choices_batched(llm, tok, exs[:2], max_length=24, normalize=True, max_tokens=64)
    assert all(abs(x - y) < 1e-3 for r, s in zip(a, b) for x, y in zip(r, s))
    # the scores are not all equal (a broken gather that always reads one position would be caught)
    assert len({round(x, 4) for r in b for x in r}) > 2
