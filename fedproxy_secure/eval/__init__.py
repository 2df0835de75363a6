"""Evaluation: log-likelihood multiple-choice scoring, balanced accuracy with prior-only and chance
baselines, paired bootstrap CIs, per-example predictions, a score cache, and perplexity."""

from fedproxy_secure.eval.bootstrap import paired_bootstrap
from fedproxy_secure.eval.metrics import TaskView, credit, credits, is_fixed_label, task_metrics
from fedproxy_secure.eval.multiple_choice import (
    EvalResult, evaluate_tasks, model_logits_fn, score_choices, tokenize_pair,
)
from fedproxy_secure.eval.perplexity import perplexity
from fedproxy_secure.eval.predictions import read_jsonl, summaries_from_jsonl, summarise_predictions, write_jsonl
from fedproxy_secure.eval.score_cache import ScoreCache

__all__ = ["EvalResult", "ScoreCache", "TaskView", "credit", "credits", "evaluate_tasks", "is_fixed_label",
           "model_logits_fn", "paired_bootstrap", "perplexity", "read_jsonl", "score_choices", "summaries_from_jsonl",
           "summarise_predictions", "task_metrics", "tokenize_pair", "write_jsonl"]
