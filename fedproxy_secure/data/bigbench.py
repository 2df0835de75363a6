"""BIG-bench JSON multiple-choice tasks (``{"examples": [{"input", "target_scores"}], ...}``).

Two prompt formats (``PROMPT_FORMATS``):

* ``"bigbench"`` (the loader's default, BIG-bench's JSON-task rendering): ``task_prefix`` +
  ``example_input_prefix`` + input (+ ``choice:`` lines when ``append_choices_to_input``, the
  default) + ``example_output_prefix``; a choice is scored as its bare text right after the prompt
  (whose output prefix usually ends in a space).
* ``"reference"`` (DESIGN section 7, the evaluation benchmarks' default): the same rendering without
  ``choice:`` lines, trailing spaces of the prompt removed, and every choice scored with one leading
  space (``"A:" + " neutral"``), i.e. how a BPE tokenizer sees the answer word in running text.

A choice is scored by the model's log-likelihood of its text after the prompt. Each example keeps
its index in the task file as ``uid`` (stable across formats and splits).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from fedproxy_secure.errors import DataError

_DEFAULT_INPUT_PREFIX = "\nQ: "
_DEFAULT_OUTPUT_PREFIX = "\nA: "
_DEFAULT_CHOICE_PREFIX = "\n  choice: "
PROMPT_FORMATS = ("bigbench", "reference")


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice item: the rendered prompt, the choice texts and the index of the answer."""

    prompt: str
    choices: tuple[str, ...]
    answer: int
    task: str
    uid: int = -1

    @property
    def response(self) -> str:
        """The correct choice's text (the training target)."""
        return self.choices[self.answer]


@dataclass(frozen=True)
class Task:
    name: str
    examples: tuple[MCExample, ...]


def list_tasks(data_dir: str | Path) -> list[str]:
    """Task names (file stems) of every ``*.json`` task in ``data_dir``, sorted."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data.dir: folder {str(d)!r} does not exist")
    names = sorted(p.stem for p in d.glob("*.json"))
    if not names:
        raise DataError(f"data.dir: {str(d)!r} holds no BIG-bench *.json task files")
    return names


def _task_file(data_dir: Path, name: str) -> Path:
    for cand in (data_dir / f"{name}.json", data_dir / name / "task.json"):
        if cand.is_file():
            return cand
    raise DataError(f"data.tasks: task {name!r} not found in {str(data_dir)!r} (expected {name}.json)")


def load_task(data_dir: str | Path, name: str, prompt_format: str = "bigbench") -> Task:
    """Load and render one task in ``prompt_format`` (see the module docstring).

    Guarantees: example ``uid`` is its index in the file; choices keep the file's order; raises
    DataError naming the example at fault if malformed, ConfigError for an unknown format.
    """
    if prompt_format not in PROMPT_FORMATS:
        from fedproxy_secure.errors import ConfigError

        raise ConfigError(f"prompt_format: {prompt_format!r} is unknown; choose one of {', '.join(PROMPT_FORMATS)}")
    path = _task_file(Path(data_dir), name)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("examples"), list) or not raw["examples"]:
        raise DataError(f"{path}: needs a non-empty 'examples' list")
    task_prefix = raw.get("task_prefix", "")
    in_prefix = raw.get("example_input_prefix", _DEFAULT_INPUT_PREFIX)
    out_prefix = raw.get("example_output_prefix", _DEFAULT_OUTPUT_PREFIX)
    choice_prefix = raw.get("choice_prefix", _DEFAULT_CHOICE_PREFIX)
    append = raw.get("append_choices_to_input", True)
    out = []
    for i, ex in enumerate(raw["examples"]):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(scores, dict) or len(scores) < 2 or not isinstance(ex.get("input"), str):
            raise DataError(f"{path}: examples[{i}] needs 'input' (str) and 'target_scores' with >= 2 choices")
        choices = tuple(str(c) for c in scores)
        best = max(scores.values())
        answer = next(j for j, c in enumerate(scores) if scores[c] == best)
        body = ex["input"]
        if prompt_format == "reference":
            prompt = (task_prefix + in_prefix + body + out_prefix).rstrip(" ")
            out.append(MCExample(prompt, tuple(" " + c.lstrip(" ") for c in choices), answer, name, i))
            continue
        if append:
            body += "".join(choice_prefix + c for c in choices)
        out.append(MCExample(task_prefix + in_prefix + body + out_prefix, choices, answer, name, i))
    return Task(name, tuple(out))


def split_task(task: Task, n_train: int, n_test: int, seed: int = 0) -> tuple[list[MCExample], list[MCExample]]:
    """Deterministic disjoint split: shuffle with ``seed``, first ``n_test`` to test, next ``n_train`` to train."""
    idx = list(range(len(task.examples)))
    random.Random(f"{seed}:{task.name}").shuffle(idx)
    test = [task.examples[i] for i in idx[:n_test]]
    train = [task.examples[i] for i in idx[n_test : n_test + n_train]]
    return train, test
