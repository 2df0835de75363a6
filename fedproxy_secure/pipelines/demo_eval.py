"""Evaluation shared by ``simulate`` and ``demo``, through the shipped evaluator and the fused-folder loader.

Every method's option scores go into prediction rows (``predictions.jsonl``); every number in
``results.json["evaluation"]`` comes from :func:`fedproxy_secure.eval.summarise_predictions` over
those rows: balanced accuracy per task, the macro headline, prior-only and chance rows, and the
paired bootstrap 95% CI of each method minus the zero-shot LLM. The fused LLM is scored only after
being written as a signed fused folder (``fuse.write_logit_folder`` / ``write_dense_folder``) and
loaded back with :func:`fedproxy_secure.fuse.load_fused_model`, the loader an operator serves with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from fedproxy_secure.data import MCExample
from fedproxy_secure.errors import ConfigError

REFERENCE = "zs_llm"
LABELS = {"zs_llm": "LLM (zero-shot)", "zs_proxy": "proxy (untuned)", "proxy_tuned": "proxy + global LoRA",
          "fused": "fused LLM", "fused_nodp": "fused LLM (no DP)", "proxy_tuned_nodp": "proxy + LoRA (no DP)",
          "prior_only": "prior-only", "chance": "chance"}


def label(method: str) -> str:
    """The readable name of a method code (the code itself when unknown)."""
    return LABELS.get(method, method)


@dataclass
class Evaluation:
    """Collects prediction rows of several methods on one fixed test split and summarises them.

    ``train_sets`` (task -> training examples, pooled over sites) only feeds the prior-only row.
    """

    tokenizer: object
    test_sets: Mapping[str, Sequence[MCExample]]
    train_sets: Mapping[str, Sequence[MCExample]]
    batch_size: int = 16
    max_length: int = 512
    device: str = "cpu"
    seed: int = 0
    rows: list[dict] = field(default_factory=list)

    def score(self, method: str, logits_fn: Callable, advance: Callable[[int], None] | None = None) -> None:
        """Score every test example with ``logits_fn`` and keep the rows under ``method``."""
        from fedproxy_secure.eval import score_choices
        from fedproxy_secure.eval.predictions import rows_for

        for task, exs in self.test_sets.items():
            sc = score_choices(logits_fn, self.tokenizer, list(exs), batch_size=self.batch_size,
                               max_length=self.max_length, device=self.device)
            self.rows += rows_for(method, self.seed, list(exs), sc)
            if advance is not None:
                advance(1)

    def add_baselines(self) -> None:
        """Prior-only (training split's majority answer per task) and chance rows."""
        from fedproxy_secure.eval.metrics import TaskView, chance_scores, prior_only_scores, training_prior
        from fedproxy_secure.eval.predictions import rows_for

        for task, exs in self.test_sets.items():
            exs = list(exs)
            view = TaskView(tuple(tuple(e.choices) for e in exs), tuple(e.answer for e in exs))
            prior = training_prior([e.response for e in self.train_sets.get(task, [])])
            self.rows += rows_for("prior_only", self.seed, exs, prior_only_scores(view, prior))
            self.rows += rows_for("chance", self.seed, exs, chance_scores(view))

    def summary(self, n_boot: int = 2000) -> dict:
        """``summarise_predictions`` of the rows (reference: zero-shot LLM), plus readable labels."""
        from fedproxy_secure.eval import summarise_predictions

        s = summarise_predictions(self.rows, reference=REFERENCE, upper=None, n_boot=n_boot, seed=self.seed)
        s["labels"] = {m: label(m) for m in s["methods"]}
        return s

    def write_predictions(self, path: str | Path) -> Path:
        """Write the rows as JSONL (task, example id, gold, option scores, method, seed)."""
        from fedproxy_secure.eval import write_jsonl

        write_jsonl(self.rows, path)
        return Path(path)


def legacy_view(summary: dict, method: str) -> dict:
    """``{"mean_accuracy", "per_task", "n_per_task", "balanced_accuracy"}`` of one method, for readers
    of the older results layout (accuracy per task; the headline is ``balanced_accuracy``)."""
    m = summary["methods"][method]
    return {"mean_accuracy": m["macro_accuracy"], "per_task": {t: v["accuracy"] for t, v in m["per_task"].items()},
            "n_per_task": dict(summary["n_per_task"]), "balanced_accuracy": m["headline"]}


def train_by_task(client_data: Sequence[Sequence[MCExample]]) -> dict[str, list[MCExample]]:
    """Training examples of every site pooled per task (for the prior-only row)."""
    out: dict[str, list[MCExample]] = {}
    for part in client_data:
        for ex in part:
            out.setdefault(ex.task, []).append(ex)
    return out


def fused_logits_fn(model) -> Callable:
    """A logits function for a model returned by ``load_fused_model`` (dense or logit plug-in)."""
    from fedproxy_secure.eval import model_logits_fn

    return model_logits_fn(model)


def write_and_load_fused(llm_dir: str | Path, proxy_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                         *, method: str = "weight", beta: float = 1.0, scale: float = 1.0,
                         source_round: int | None = None, aggregator: str | None = None):
    """Write a signed fused folder with the fuse package's writer, then load it back through
    :func:`fedproxy_secure.fuse.load_fused_model`. Returns ``(model, fused_meta, keyset_path)``.

    Guarantees: a fresh Ed25519 key signs the folder and is never written to disk; only its
    keyset (public key) is written beside the folder (``<out_dir>.keyset.json``), and the model
    returned is the one the loader verified and parsed.
    """
    from fedproxy_secure.artifacts import create_keyset, generate_key
    from fedproxy_secure.artifacts.keyset import save_keyset
    from fedproxy_secure.fuse import load_fused_model, write_dense_folder, write_logit_folder

    out_dir = Path(out_dir)
    key = generate_key()
    ks_path = out_dir.parent / f"{out_dir.name}.keyset.json"
    save_keyset(create_keyset(key, name="fused-eval"), ks_path)
    if method == "logit":
        meta = write_logit_folder(llm_dir, proxy_dir, adapter_dir, out_dir, key, beta=beta,
                                  source_round=source_round, aggregator=aggregator)
    elif method in ("weight", "delta"):
        meta = write_dense_folder(llm_dir, proxy_dir, adapter_dir, out_dir, key, method=method, scale=scale,
                                  source_round=source_round, aggregator=aggregator)
    else:
        raise ConfigError(f"fusion.method: {method!r} is not one of logit, weight, delta")
    del key
    return load_fused_model(out_dir, ks_path), meta, ks_path


def ci_sentence(summary: dict, method: str) -> str:
    """'+x.x points (95% CI [a, b])' of ``method`` minus the zero-shot LLM, in balanced-accuracy points."""
    row = summary["methods"].get(method)
    if row is None or "diff_ci" not in row:
        return "-"
    lo, hi = row["diff_ci"]
    return f"{100 * row['diff_to_reference']:+.1f} points (95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}])"


def dump(summary: dict) -> str:
    """The summary as indented JSON (for logs and tests)."""
    return json.dumps(summary, indent=2, default=float)
