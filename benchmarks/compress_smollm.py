"""Zero-shot accuracy of an LLM and its proxies on the 8 BIG-bench tasks (100 test per task, seed 0).

Usage: python -m fedproxy_benchmarks.compress_smollm OUT.json DATA_DIR MODEL_DIR [MODEL_DIR ...]
Each model's result is appended to OUT.json as soon as it is measured.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def evaluate_folder(model_dir: str, data_dir: str, n_test: int = 100) -> dict:
    """Mean and per-task zero-shot accuracy of one model folder, and the wall time."""
    from fedproxy_secure.data import list_tasks, load_task, split_task
    from fedproxy_secure.eval import evaluate_tasks, model_logits_fn
    from fedproxy_secure.models import count_parameters, load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    tests = {t: split_task(load_task(data_dir, t), 200, n_test, seed=0)[1] for t in list_tasks(data_dir)}
    t0 = time.perf_counter()
    with torch.inference_mode():
        res = evaluate_tasks(model_logits_fn(model), tok, tests, batch_size=16, max_length=512)
    return {"model": model_dir, "n_params": count_parameters(model), "eval_s": time.perf_counter() - t0, **res.to_dict()}


def main(argv: list[str]) -> None:
    torch.set_num_threads(2)
    out, data_dir, models = Path(argv[0]), argv[1], argv[2:]
    results = json.loads(out.read_text()) if out.exists() else {}
    for m in models:
        r = evaluate_folder(m, data_dir)
        results[m] = r
        out.write_text(json.dumps(results, indent=2))
        print(f"{m}: mean {100 * r['mean_accuracy']:.1f}%  ({r['eval_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
