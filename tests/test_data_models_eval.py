"""Data loaders, partitions, tiny models, block discovery and the multiple-choice evaluator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.data import (
    list_tasks, load_jsonl, load_task, partition_by_task, partition_dirichlet, partition_iid, split_task,
)
from fedproxy_secure.errors import ConfigError, DataError, ModelError
from fedproxy_secure.eval import evaluate_tasks, model_logits_fn, perplexity, score_choices
from fedproxy_secure.models import build_tiny_model, byte_tokenizer, decoder_blocks, load_causal_lm
from fedproxy_secure.models.tiny import save_tiny_llm

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "bigbench-mini"


def test_bigbench_rendering_and_split() -> None:
    names = list_tasks(DATA)
    assert len(names) == 8
    task = load_task(DATA, "sports_understanding")
    ex = task.examples[0]
    assert ex.prompt.startswith("Determine whether") and ex.prompt.endswith("\nPlausible/implausible? ")
    assert ex.choices == ("plausible", "implausible") and ex.response in ex.choices
    train, test = split_task(task, 30, 20, seed=0)
    assert len(train) == 30 and len(test) == 20
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert split_task(task, 30, 20, seed=0) == (train, test)  # deterministic


def test_bigbench_default_prefixes_append_choices() -> None:
    ex = load_task(DATA, "metaphor_boolean").examples[0]  # no prefixes given: BIG-bench defaults apply
    assert "\nQ: " in ex.prompt and "\n  choice: True" in ex.prompt and ex.prompt.endswith("\nA: ")
    ex = load_task(DATA, "strategyqa").examples[0]  # append_choices_to_input: false
    assert "choice:" not in ex.prompt and ex.prompt.endswith("\nA: ")


def test_malformed_task_names_example(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"examples": [{"input": "x", "target_scores": {"a": 1}}]}))
    with pytest.raises(DataError, match=r"examples\[0\]"):
        load_task(tmp_path, "bad")
    with pytest.raises(DataError, match="not found"):
        load_task(tmp_path, "missing")


def test_jsonl_loader(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match=":3:"):
        load_jsonl(p)
    p.write_text('{"prompt": "a", "response": "b"}\n')
    assert load_jsonl(p)[0].response == "b"
    p.write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_jsonl(p)


def test_partitions_cover_everything() -> None:
    assert partition_by_task(["a", "b", "c"], 3) == [["a"], ["b"], ["c"]]
    with pytest.raises(ConfigError, match="clients.count"):
        partition_by_task(["a"], 2)
    parts = partition_iid(list(range(10)), 3, seed=1)
    assert sorted(x for p in parts for x in p) == list(range(10))
    labels = [i % 4 for i in range(200)]
    d = partition_dirichlet(labels, 5, alpha=0.1, seed=0)
    assert sorted(i for p in d for i in p) == list(range(200))
    skew = [len({labels[i] for i in p}) for p in d if p]
    assert min(skew) < 4  # alpha=0.1 leaves some client without some label


@pytest.mark.parametrize("arch,path", [("llama", "model.layers"), ("gpt2", "transformer.h")])
def test_tiny_models_and_blocks(tmp_path: Path, arch: str, path: str) -> None:
    spec = TinyModelSpec(arch=arch, layers=3, hidden=16, heads=2, intermediate=32, vocab=259)
    folder = save_tiny_llm(spec, tmp_path / arch)
    model = load_causal_lm(folder)
    p, blocks, _ = decoder_blocks(model)
    assert p == path and len(blocks) == 3
    ref = build_tiny_model(spec)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_not_a_causal_lm_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ModelError, match="not a causal language model"):
        load_causal_lm(tmp_path)
    with pytest.raises(ModelError, match="decoder block"):
        decoder_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_choice_scores_match_manual_loglik() -> None:
    tok = byte_tokenizer()
    model = build_tiny_model(TinyModelSpec(layers=2, hidden=16, heads=2, intermediate=32, vocab=259))
    ex = load_task(DATA, "navigate").examples[:3]
    scores = score_choices(model_logits_fn(model), tok, ex, batch_size=2)
    e = ex[1]
    p = tok(e.prompt, add_special_tokens=False)["input_ids"]
    c = tok(e.choices[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0], -1)
    manual = sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(c))
    assert scores[1][1] == pytest.approx(manual, abs=1e-4)


def test_perplexity_of_uniform_model_is_vocab_size() -> None:
    tok = byte_tokenizer()

    class Uniform(torch.nn.Module):
        def forward(self, input_ids):
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, len(tok))})()

    assert perplexity(Uniform(), tok, ["hello world"]) == pytest.approx(len(tok), rel=1e-4)


def test_reference_prompt_format_has_no_choice_lines_and_spaced_answers() -> None:
    bb = load_task(DATA, "sports_understanding", prompt_format="bigbench").examples[0]
    ref = load_task(DATA, "sports_understanding", prompt_format="reference").examples[0]
    assert ref.uid == bb.uid == 0 and ref.answer == bb.answer
    assert "choice:" not in ref.prompt and not ref.prompt.endswith(" ")
    assert ref.choices == tuple(" " + c for c in bb.choices)
    assert ref.prompt + ref.response == bb.prompt.rstrip(" ") + " " + bb.response
    with pytest.raises(ConfigError, match="prompt_format"):
        load_task(DATA, "sports_understanding", prompt_format="chat")
