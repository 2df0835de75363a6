"""DP-SGD on the SmolLM2 proxy: ε per round over a 3-round plan, refusal of a 4th, seconds/step DP vs non-DP.

The proxy is SmolLM2-135M-Instruct (4-bit-dequantised weights) cut to 15 of 30 blocks by keeping every
other block (a stand-in for the BI proxy; the client cost depends on the shape, not on which blocks).
Data: one BIG-bench task's train split (split_task seed 0). Same expected batch size with and without DP.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def _answer_loss(model, tok, examples, max_length: int) -> float:
    from fedproxy_secure.client.batches import collate, encode_examples, per_example_loss

    b = collate(encode_examples(tok, examples, max_length).items, tok.pad_token_id)
    return float(per_example_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["labels"]).mean())


def run_client_dp(model_dir: str, data_dir: str, task: str = "sports_understanding", n_train: int = 64,
                  rounds: int = 3, local_steps: int = 5, batch_size: int = 8, max_length: int = 256,
                  epsilon: float = 8.0, delta: float = 1e-5, json_file: str | None = None, log=print) -> dict:
    """Run ``rounds`` DP rounds (+1 refused) and ``local_steps`` non-DP steps; return the figures."""
    from fedproxy_secure.client.trainer import ClientRoundSpec, train_round
    from fedproxy_secure.config import DPConfig, LoraConfig
    from fedproxy_secure.data import load_task, split_task
    from fedproxy_secure.errors import PrivacyBudgetExceeded
    from fedproxy_secure.lora import attach_lora, get_lora_vector
    from fedproxy_secure.models import decoder_blocks, load_causal_lm, load_tokenizer, set_decoder_blocks
    from fedproxy_secure.privacy import PrivacyBudget

    base = load_causal_lm(model_dir)
    tok = load_tokenizer(model_dir)
    n_blocks = len(decoder_blocks(base)[1])
    train, _ = split_task(load_task(data_dir, task), n_train=n_train, n_test=100, seed=0)
    llm_loss = _answer_loss(base, tok, train[:batch_size], max_length)
    set_decoder_blocks(base, list(range(0, n_blocks, 2)))
    proxy_loss = _answer_loss(base, tok, train[:batch_size], max_length)
    log(f"answer-token loss on {batch_size} train examples: LLM {llm_loss:.3f}, proxy (15/30 blocks) {proxy_loss:.3f}")
    lcfg = LoraConfig(r=8, alpha=16, ffa=True)
    dp = DPConfig(enabled=True, epsilon=epsilon, delta=delta, max_grad_norm=1.0)

    def spec(pm, rid, theta, use_dp):
        return ClientRoundSpec(round_id=rid, a_seed=0, theta_global=theta, conflict=None, pcr_lambda=1e-5, lr=2e-4,
                               local_steps=local_steps, batch_size=batch_size, max_length=max_length, clip_norm=1.0,
                               dp=dp if use_dp else None, planned_rounds=rounds)

    plain = attach_lora(copy.deepcopy(base), lcfg, 0)
    t = time.perf_counter()
    up = train_round(plain, tok, train, spec(plain, 0, get_lora_vector(plain), False))
    plain_s = up.metrics["seconds_per_step"]
    log(f"non-DP: {plain_s:.2f} s/step, loss {up.metrics['train_loss']:.4f} ({time.perf_counter() - t:.1f} s)")
    del plain

    pm = attach_lora(base, lcfg, 0)
    out: dict = {"model": "SmolLM2-135M-Instruct (Q4_1 dequantised), proxy = every other block (15/30)",
                 "task": task, "n_train": len(train), "local_steps": local_steps, "batch_size": batch_size,
                 "max_length": max_length, "lora": lcfg.model_dump(), "epsilon_target": epsilon, "delta": delta,
                 "torch_threads": torch.get_num_threads(), "llm_answer_loss": llm_loss, "proxy_answer_loss": proxy_loss, "nondp_seconds_per_step": plain_s,
                 "nondp_train_loss": up.metrics["train_loss"], "rounds": []}
    with tempfile.TemporaryDirectory() as tmp:
        budget = PrivacyBudget(Path(tmp) / "budget.json", total_epsilon=epsilon, delta=delta)
        theta = get_lora_vector(pm)
        for rid in range(rounds):
            u = train_round(pm, tok, train, spec(pm, rid, theta, True), budget=budget)
            theta = theta + u.delta
            m = u.metrics
            row = {k: m[k] for k in ("epsilon", "noise_multiplier", "sample_rate", "accountant", "train_loss",
                                     "pre_clip_norm", "seconds_per_step", "truncated")}
            row["round_id"] = rid
            out["rounds"].append(row)
            log(f"DP round {rid}: epsilon {m['epsilon']:.3f} (delta {delta}, {m['accountant']}), sigma "
                f"{m['noise_multiplier']:.3f}, q {m['sample_rate']:.4f}, {m['seconds_per_step']:.2f} s/step, "
                f"loss {m['train_loss']:.4f}")
        try:
            train_round(pm, tok, train, spec(pm, rounds, theta, True), budget=budget)
            out["refused"] = None
        except PrivacyBudgetExceeded as exc:
            out["refused"] = str(exc)
            log(f"round {rounds}: refused: {exc}")
    dp_s = float(np.mean([r["seconds_per_step"] for r in out["rounds"]]))
    out["dp_seconds_per_step"] = dp_s
    out["dp_over_nondp"] = dp_s / plain_s
    out["timing_same_batch"] = tm = time_dp_vs_plain(pm, tok, train, batch_size, max_length)
    log(f"same fixed batch of {batch_size}: non-DP {tm['plain_median_s']:.2f} s/step, DP {tm['dp_median_s']:.2f} "
        f"s/step, ratio {tm['dp_over_plain']:.2f} (medians of {tm['reps']})")
    if json_file:
        Path(json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(json_file).write_text(json.dumps(out, indent=1))
    return out


def time_dp_vs_plain(pm, tok, examples, batch_size: int = 8, max_length: int = 256, reps: int = 4) -> dict:
    """Seconds per optimizer step on the *same* fixed batch, non-DP vs DP (per-sample grads, clip, noise).

    Steps alternate (plain, DP, plain, DP, ...) after one warm-up each, so load from other processes
    hits both alike; medians are reported.
    """
    from fedproxy_secure.client.batches import collate, encode_examples, per_example_loss
    from fedproxy_secure.lora import trainable_lora_params
    from fedproxy_secure.privacy.dp_sgd import dropout_off, make_dp_optimizer, make_grad_sample_module

    params = trainable_lora_params(pm)
    items = encode_examples(tok, examples[:batch_size], max_length).items
    b = collate(items, tok.pad_token_id)
    plain_opt = torch.optim.AdamW(params, lr=1e-6)

    def plain_step():
        plain_opt.zero_grad(set_to_none=True)
        per_example_loss(pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]).mean().backward()
        plain_opt.step()

    pm.train()
    times = {"plain": [], "dp": []}
    with dropout_off(pm):
        for rep in range(reps + 1):
            t = time.perf_counter()
            plain_step()
            if rep:
                times["plain"].append(time.perf_counter() - t)
            gsm = make_grad_sample_module(pm)
            dp_opt = make_dp_optimizer(torch.optim.AdamW(params, lr=1e-6), noise_multiplier=1.0, max_grad_norm=1.0,
                                       expected_batch_size=batch_size)
            t = time.perf_counter()
            dp_opt.zero_grad(set_to_none=True)
            out = gsm(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            per_example_loss(out.logits, b["labels"]).mean().backward()
            dp_opt.step()
            if rep:
                times["dp"].append(time.perf_counter() - t)
            gsm._close()
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"batch_size": batch_size, "tokens_per_example_max": max(len(e.ids) for e in items), "reps": reps,
            "plain_s": times["plain"], "dp_s": times["dp"], "plain_median_s": med["plain"], "dp_median_s": med["dp"],
            "dp_over_plain": med["dp"] / med["plain"]}


def print_table(res: dict) -> None:
    """Rich table of ε per round and seconds per step."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"DP-SGD on the proxy ({res['task']}, {res['n_train']} examples, batch {res['batch_size']})")
    for c in ("round", "epsilon", "sigma", "q", "s/step", "loss"):
        t.add_column(c)
    for r in res["rounds"]:
        t.add_row(str(r["round_id"]), f"{r['epsilon']:.3f}", f"{r['noise_multiplier']:.3f}", f"{r['sample_rate']:.4f}",
                  f"{r['seconds_per_step']:.2f}", f"{r['train_loss']:.4f}")
    t.add_row("4th", "refused" if res.get("refused") else "NOT refused", "", "", "", "")
    Console().print(t)
    tm = res["timing_same_batch"]
    Console().print(f"same fixed batch of {tm['batch_size']}: s/step non-DP {tm['plain_median_s']:.2f}, "
                    f"DP {tm['dp_median_s']:.2f}, ratio {tm['dp_over_plain']:.2f} (medians of {tm['reps']}, alternated)")


if __name__ == "__main__":
    import sys

    torch.set_num_threads(2)
    r = run_client_dp(sys.argv[1], sys.argv[2], json_file=sys.argv[3] if len(sys.argv) > 3 else None)
    print_table(r)
