"""Evaluation: log-likelihood multiple-choice accuracy and perplexity."""

from fedproxy_secure.eval.multiple_choice import (
    EvalResult, evaluate_tasks, model_logits_fn, score_choices, tokenize_pair,
)
from fedproxy_secure.eval.perplexity import perplexity

__all__ = ["EvalResult", "evaluate_tasks", "model_logits_fn", "perplexity", "score_choices", "tokenize_pair"]
