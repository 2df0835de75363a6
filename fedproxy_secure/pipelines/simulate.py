"""The whole FedProxy method in one process: compress -> clients train LoRA -> aggregate -> fuse -> evaluate.

Each stage is its own module; this file only wires them in protocol order so a reader sees a round
top to bottom. The network deployment (``fedproxy_secure.server``) runs the same stages across
processes; every secure sum here runs the network's own stage machines in memory
(:class:`~fedproxy_secure.pipelines.stage_sum.StageMachineSummer`), and the aggregation step is the
same ``aggregate/`` math the round engine's modes call. Benchmarks reuse :func:`prepare` and :func:`federate`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedproxy_secure.aggregate import AggState
from fedproxy_secure.config import RunConfig, dump_config
from fedproxy_secure.data import MCExample, list_tasks, load_task, partition_by_task, partition_iid, split_task
from fedproxy_secure.data.partition import partition_dirichlet
from fedproxy_secure.errors import ConfigError, FedProxyError
from fedproxy_secure.eval import model_logits_fn
from fedproxy_secure.pipelines.round_driver import GlobalStepper, client_round_fields, federation_a_seed, run_aggregator
from fedproxy_secure.pipelines.stage_sum import StageMachineSummer
from fedproxy_secure.secagg import DropoutPlan

Log = Callable[[str], None]


@dataclass
class Prepared:
    """Everything a federation needs, built once: the LLM, the proxy and the data split."""

    llm: torch.nn.Module
    tokenizer: object
    proxy: object  # fedproxy_secure.compress.CompressedProxy
    client_data: list[list[MCExample]]
    client_tasks: list[list[str]]
    test_sets: dict[str, list[MCExample]]
    calib_texts: list[str]
    llm_hash: str


@dataclass
class FederationOutcome:
    """The global LoRA after the last round and the per-round log."""

    theta: np.ndarray
    rounds: list[dict] = field(default_factory=list)
    peft_proxy: object = None  # the proxy with LoRA attached, holding ``theta``


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def load_llm(cfg: RunConfig):
    """The server's LLM and tokenizer: a local HF folder or a tiny model built from the spec."""
    from fedproxy_secure.models import build_tiny_model, byte_tokenizer, load_causal_lm, load_tokenizer, weights_hash

    if cfg.model.llm is not None:
        return load_causal_lm(cfg.model.llm, device=cfg.train.device), load_tokenizer(cfg.model.llm), weights_hash(cfg.model.llm)
    spec = cfg.model.tiny
    model = build_tiny_model(spec).to(cfg.train.device)
    h = hashlib.sha256(json.dumps(spec.model_dump(), sort_keys=True).encode()).hexdigest()
    return model, byte_tokenizer(), h


def split_data(cfg: RunConfig) -> tuple[list[list[MCExample]], list[list[str]], dict[str, list[MCExample]], list[str]]:
    """Client training sets, client task names, test sets per task and server calibration texts.

    Calibration texts come only from ``data.calib_tasks`` (server data no client holds).
    """
    d = cfg.data
    available = list_tasks(d.dir)
    calib_dir = d.calib_dir or d.dir
    calib_available = list_tasks(calib_dir)
    for t in d.tasks or []:
        if t not in available:
            raise ConfigError(f"data.tasks: task {t!r} is not in {d.dir} (available: {', '.join(available)})")
    for t in d.calib_tasks:
        if t not in calib_available:
            raise ConfigError(f"data.calib_tasks: task {t!r} is not in {calib_dir} (available: {', '.join(calib_available)})")
    tasks = [t for t in (d.tasks or available) if t not in d.calib_tasks]
    if not tasks:
        raise ConfigError("data.tasks: no client tasks left after removing data.calib_tasks")
    train, test = {}, {}
    for t in tasks:
        train[t], test[t] = split_task(load_task(d.dir, t), d.limit_train, d.limit_test, seed=cfg.seed)
    n = cfg.clients.count
    if d.partition == "task":
        client_tasks = partition_by_task(tasks, n)
        client_data = [[ex for t in ts for ex in train[t]] for ts in client_tasks]
    else:
        pool = [ex for t in tasks for ex in train[t]]
        if d.partition == "iid":
            client_data = partition_iid(pool, n, seed=cfg.seed)
        else:
            parts = partition_dirichlet([ex.task for ex in pool], n, d.dirichlet_alpha, seed=cfg.seed)
            client_data = [[pool[i] for i in p] for p in parts]
        client_tasks = [sorted({ex.task for ex in part}) for part in client_data]
    calib = [ex.prompt for t in d.calib_tasks for ex in load_task(calib_dir, t).examples[: cfg.compress.calib_examples]]
    return client_data, client_tasks, test, calib


def prepare(cfg: RunConfig, log: Log = print, *, bars: bool | None = None) -> Prepared:
    """Load the LLM, split the data and compress the LLM into the proxy (stage i).

    ``bars``: draw the compression progress bar (default: only when stderr is a terminal).
    """
    from fedproxy_secure.compress import compress
    from fedproxy_secure.progress import bars_enabled

    _seed_all(cfg.seed)
    llm, tok, llm_hash = load_llm(cfg)
    client_data, client_tasks, test_sets, calib = split_data(cfg)
    if not calib:
        if cfg.compress.strategy == "bi" or cfg.compress.distill:
            raise ConfigError(
                "data.calib_tasks: empty, but compress.strategy=bi / compress.distill needs server calibration "
                "text (fix: name tasks no client holds in data.calib_tasks, or use compress.strategy: uniform)"
            )
    log(f"stage i: compressing ({cfg.compress.strategy}, keep {cfg.compress.keep_ratio:.2f}) on {len(calib)} server texts")
    proxy = compress(llm, tok, calib, cfg.compress, progress=bars_enabled() if bars is None else bars,
                     device=cfg.train.device)
    proxy.meta["base_model_hash"] = llm_hash
    return Prepared(llm, tok, proxy, client_data, client_tasks, test_sets, calib, llm_hash)


def _secure_sum_fn(cfg: RunConfig, cohort: list[int], dropped: set[int], round_id: int, record: dict):
    """A ``list[vector] -> sum`` over the configured secure-aggregation mode for one phase of one round.

    The list is aligned with the surviving cohort members; clients in ``dropped`` advertised keys
    and shared them, then went silent before sending their masked input, so the protocol must
    recover their pairwise masks. Records survivors and the error against the plaintext sum.
    """
    mode = cfg.secagg.mode
    # the network's own stage machines (protocol/modes), so simulate's sums are the network's by construction
    summer = StageMachineSummer("plain" if mode == "none" else mode, clip_range=1.0)
    survivors = [c for c in cohort if c not in dropped]
    t = cfg.secagg.threshold_for(len(cohort)) if mode != "none" else 1
    phase = [0]

    def fn(vectors: list[np.ndarray]) -> np.ndarray:
        phase[0] += 1
        if len(vectors) != len(survivors):
            raise FedProxyError(f"internal: {len(vectors)} vectors for {len(survivors)} surviving clients")
        by_id = {cid + 1: np.asarray(v, dtype=np.float64) for cid, v in zip(survivors, vectors)}
        zero = np.zeros_like(next(iter(by_id.values())))
        for cid in dropped:  # never sent: their inputs cannot enter the sum
            by_id[cid + 1] = zero
        sid = hashlib.sha256(f"{cfg.name}/{cfg.seed}/round{round_id}/phase{phase[0]}".encode()).digest()
        plan = DropoutPlan({"masked_input": frozenset(c + 1 for c in dropped)}) if dropped else None
        res = summer.secure_sum(by_id, threshold=t, session_id=sid, dropouts=plan)
        plain = np.sum(np.stack(vectors), axis=0)
        err = float(np.max(np.abs(res.total - plain))) if plain.size else 0.0
        record.setdefault("secure_sum", []).append({
            "mode": res.mode, "survivors": len(res.survivors), "cohort": len(cohort), "threshold": t,
            "max_abs_error_vs_plaintext": err,
            "bytes_per_client": res.stats.get("bytes_per_client"),
        })
        return res.total

    return fn


def federate(cfg: RunConfig, prep: Prepared, out: Path, log: Log = print, progress=None,
             on_round: Callable[[int, object], dict] | None = None,
             round_done: Callable[[], None] | None = None) -> FederationOutcome:
    """Stage ii: ``cfg.rounds`` rounds of local LoRA training on the proxy + (secure) aggregation.

    ``on_round(r, peft_proxy)`` (optional) runs after round ``r`` with the proxy holding the new
    global LoRA; whatever dict it returns is stored in that round's record under ``"eval"``.
    ``progress()`` runs after each client's local training, ``round_done()`` after each round.
    Round records are numbered from 1 (``record["round"]``), as on the network.
    """
    from fedproxy_secure.client.trainer import ClientRoundSpec, TrainingAborted, train_round
    from fedproxy_secure.lora import attach_lora, get_lora_vector
    from fedproxy_secure.privacy import PrivacyBudget

    a_seed = federation_a_seed(cfg.seed)
    model = attach_lora(copy.deepcopy(prep.proxy.model), cfg.lora, a_seed)
    theta = get_lora_vector(model)
    state = AggState(round=0, conflict=None)
    n = cfg.clients.count
    rng = np.random.default_rng(cfg.seed)
    budgets = []
    for k in range(n):
        if cfg.dp.enabled:
            budgets.append(PrivacyBudget(out / "clients" / f"client{k}" / "privacy_budget.json", cfg.dp.epsilon, cfg.dp.delta))
        else:
            budgets.append(None)
    outcome = FederationOutcome(theta=theta)
    clip = cfg.train.update_clip_norm
    stepper = GlobalStepper(cfg)
    for r in range(cfg.rounds):
        t0 = time.time()
        record: dict = {"round": r + 1, "clients": []}  # numbered from 1, as over the network
        updates, counts, ids = [], [], []
        for k in range(n):
            # without DP the batch order follows the run seed (reproducible research runs); DP keeps OS entropy
            order = None if cfg.dp.enabled else int.from_bytes(
                hashlib.sha256(f"{cfg.seed}/round{r}/client{k}/batches".encode()).digest()[:8], "big") % (2**63)
            spec = ClientRoundSpec(round_id=r, a_seed=a_seed, theta_global=theta, conflict=state.conflict,
                                   dp=cfg.dp if cfg.dp.enabled else None, shuffle_seed=order, **client_round_fields(cfg, r))
            try:
                upd = train_round(model, prep.tokenizer, prep.client_data[k], spec, budget=budgets[k],
                                  device=cfg.train.device)
            except TrainingAborted as exc:
                log(f"round {r + 1}: client {k} aborted its round ({exc}); nothing sent")
                record["clients"].append({"client": k, "aborted": str(exc)})
                continue
            record["clients"].append({"client": k, "tasks": prep.client_tasks[k], **upd.metrics})
            updates.append(upd.delta / clip)  # every summed value now lies in [-1, 1]
            counts.append(upd.num_examples)
            ids.append(k)
            if progress is not None:
                progress()
        n_drop = int(round(cfg.secagg.dropout * len(ids))) if cfg.secagg.mode != "none" else 0
        dropped = set(rng.choice(ids, size=n_drop, replace=False).tolist()) if n_drop else set()
        keep = [i for i, k in enumerate(ids) if k not in dropped]
        record["dropped"] = sorted(dropped)
        agg = run_aggregator(cfg, _secure_sum_fn(cfg, ids, dropped, r, record))
        res = agg.aggregate([updates[i] for i in keep], [counts[i] for i in keep], state)
        theta, record["server_step"] = stepper.step(theta, clip * res.delta, r)
        state = AggState(round=r + 1, conflict=res.conflict)
        losses = [c["train_loss"] for c in record["clients"] if "train_loss" in c]
        norms = [c["pre_clip_norm"] for c in record["clients"] if "pre_clip_norm" in c]
        record.update({
            "train_loss": float(np.mean(losses)) if losses else None,
            "update_norm_median": float(np.median(norms)) if norms else None,
            "aggregator": res.info,
            "mean_conflict": float(np.mean(res.conflict)) if res.conflict is not None else None,
            "global_norm": float(np.linalg.norm(theta)),
            "seconds": round(time.time() - t0, 3),
        })
        if on_round is not None:
            from fedproxy_secure.lora import set_lora_vector

            set_lora_vector(model, theta)
            record["eval"] = on_round(r, model)
        outcome.rounds.append(record)
        loss = "-" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
        log(f"round {r + 1}/{cfg.rounds}: loss {loss}, survivors {len(keep)}/{len(ids)}, |theta| {record['global_norm']:.4f}")
        if round_done is not None:
            round_done()
    from fedproxy_secure.lora import set_lora_vector

    set_lora_vector(model, theta)
    outcome.theta, outcome.peft_proxy = theta, model
    return outcome


@dataclass
class Fused:
    """The server's LLM with the global LoRA plugged in: a scorer, and the dense model when weight-fused."""

    logits_fn: Callable
    model: torch.nn.Module | None
    info: dict


def fuse_outcome(cfg: RunConfig, prep: Prepared, outcome: FederationOutcome) -> Fused:
    """Stage iii, on the server only: weight plug-in (dense LLM) or logit plug-in (proxy-tuning)."""
    from fedproxy_secure.fuse.adapter import deltas_from_peft_model
    from fedproxy_secure.fuse.logit import logit_plugin_fn
    from fedproxy_secure.fuse.weight import fuse_weights

    meta = prep.proxy.meta
    if cfg.fusion.method == "logit":
        fn = logit_plugin_fn(prep.llm, outcome.peft_proxy, prep.proxy.model, beta=cfg.fusion.logit_beta)
        return Fused(fn, None, {"beta": cfg.fusion.logit_beta})
    deltas = deltas_from_peft_model(outcome.peft_proxy)
    fused = fuse_weights(prep.llm, meta, deltas, scale=cfg.fusion.scale)
    return Fused(model_logits_fn(fused), fused, {"layer_map": list(meta["layer_map"]),
                                                 "fusion_mode": meta.get("fusion_mode"),
                                                 "modules_fused": len(deltas)})


def llm_folder(cfg: RunConfig, prep: Prepared, work: Path) -> Path:
    """The LLM as a HF folder: ``model.llm`` itself, or the tiny model written under ``work``."""
    if cfg.model.llm is not None:
        return Path(cfg.model.llm)
    d = work / "llm"
    prep.llm.save_pretrained(d, safe_serialization=True)
    prep.tokenizer.save_pretrained(d)
    return d


def run_simulation(cfg: RunConfig, out: str | Path, log: Log = print, *, quiet: bool = False) -> dict:
    """Run every stage and write ``out/results.json``; return the results dict.

    Also writes ``out/proxy`` (the proxy, HF folder + ``fedproxy.json``), ``out/global_adapter``
    (PEFT adapter whose ``base_model_name_or_path`` is ``out/proxy``, so
    ``AutoPeftModelForCausalLM.from_pretrained(out/global_adapter)`` loads both), ``out/fused`` (the
    signed fused folder, loaded back through ``fuse.load_fused_model`` for evaluation) with its
    keyset ``out/fused.keyset.json``, ``out/predictions.jsonl``, ``out/accuracy.png`` and
    ``out/rounds.png``. ``results["evaluation"]`` is the shipped evaluator's summary (balanced
    accuracy, prior-only and chance rows, paired bootstrap CI of each method minus the zero-shot LLM).
    """
    import tempfile

    from fedproxy_secure.compress.proxy_io import save_proxy
    from fedproxy_secure.pipelines.demo_eval import (Evaluation, fused_logits_fn, legacy_view, train_by_task,
                                                     write_and_load_fused)
    from fedproxy_secure.progress import RunProgress, bars_enabled
    from fedproxy_secure.report import plot_accuracy, plot_rounds
    from fedproxy_secure.server.export import save_adapter_on_proxy

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    prep = prepare(cfg, log, bars=bars_enabled(quiet))
    ev = Evaluation(prep.tokenizer, prep.test_sets, train_by_task(prep.client_data), batch_size=16,
                    max_length=cfg.data.max_length, device=cfg.train.device, seed=cfg.seed)
    n_tasks = len(prep.test_sets)
    with RunProgress(quiet=quiet) as bars:
        log("evaluating the LLM and the proxy before federation")
        with bars.task("evaluate LLM + proxy (before)", 2 * n_tasks) as adv:
            ev.score("zs_llm", model_logits_fn(prep.llm), adv)
            ev.score("zs_proxy", model_logits_fn(prep.proxy.model), adv)
        with bars.task("federation: local training", cfg.rounds * cfg.clients.count) as adv_c, \
                bars.task("federation: rounds", cfg.rounds) as adv_r:
            outcome = federate(cfg, prep, out, log, progress=adv_c, round_done=adv_r)
        proxy_dir, adapter_dir = out / "proxy", out / "global_adapter"
        save_proxy(prep.proxy, prep.tokenizer, proxy_dir, base_model_hash=prep.llm_hash)
        save_adapter_on_proxy(outcome.peft_proxy, adapter_dir, proxy_dir)
        with tempfile.TemporaryDirectory(prefix="fedproxy-sim-") as work, bars.task("fusion", 1) as adv:
            llm_dir = llm_folder(cfg, prep, Path(work))
            fused, fused_meta, ks_path = write_and_load_fused(
                llm_dir, proxy_dir, adapter_dir, out / "fused", method=cfg.fusion.method, beta=cfg.fusion.logit_beta,
                scale=cfg.fusion.scale, source_round=cfg.rounds, aggregator=cfg.aggregator.name)
            adv(1)
        with bars.task("evaluate proxy + fused LLM (after)", 2 * n_tasks) as adv:
            ev.score("proxy_tuned", model_logits_fn(outcome.peft_proxy), adv)
            ev.score("fused", fused_logits_fn(fused), adv)
        ev.add_baselines()
    ev.write_predictions(out / "predictions.jsonl")
    summary = ev.summary()
    results = {
        "name": cfg.name,
        "config": dump_config(cfg),
        "compression": {k: v for k, v in prep.proxy.meta.items() if k != "bi_scores"} | {"bi_scores": prep.proxy.meta.get("bi_scores")},
        "client_tasks": prep.client_tasks,
        "client_examples": [len(d) for d in prep.client_data],
        "evaluation": summary,
        "llm_before": legacy_view(summary, "zs_llm"),
        "proxy_before": legacy_view(summary, "zs_proxy"),
        "proxy_after": legacy_view(summary, "proxy_tuned"),
        "llm_after": legacy_view(summary, "fused"),
        "fusion": {"method": cfg.fusion.method, "scale": cfg.fusion.scale, "beta": cfg.fusion.logit_beta,
                   "folder": "fused", "keyset": ks_path.name, "loaded_with": "fedproxy_secure.fuse.load_fused_model",
                   "modules_fused": fused_meta.get("modules_fused"), "layer_map": fused_meta.get("layer_map"),
                   "fusion_mode": fused_meta.get("fusion_mode")},
        "artifacts": {"proxy": "proxy", "adapter": "global_adapter", "fused": "fused", "predictions": "predictions.jsonl"},
        "secagg_mode": cfg.secagg.mode,
        "aggregator": cfg.aggregator.name,
        "dp": {"enabled": cfg.dp.enabled, "epsilon_budget": cfg.dp.epsilon, "delta": cfg.dp.delta},
        "rounds": outcome.rounds,
        "train_loss": [r["train_loss"] for r in outcome.rounds],
        "seconds": round(time.time() - t_start, 2),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=json_default))
    plot_accuracy(out / "accuracy.png", summary, title=f"{cfg.name}: macro balanced accuracy")
    plot_rounds(out / "rounds.png", rounds_series(results))
    return results


def rounds_series(results: dict) -> dict:
    """Per-round series for :func:`fedproxy_secure.report.plot_rounds` from a simulate results dict."""
    eps: dict[str, list] = {}
    for rec in results["rounds"]:
        for c in rec["clients"]:
            if c.get("epsilon") is not None:
                eps.setdefault(f"site{c['client']}", []).append((rec["round"], c["epsilon"]))
    return {"loss": {"mean over sites": [(r["round"], r["train_loss"]) for r in results["rounds"]
                                         if r["train_loss"] is not None]},
            "epsilon": eps, "epsilon_budget": results["dp"]["epsilon_budget"] if results["dp"]["enabled"] else None}


def json_default(o):
    """``json.dumps(default=...)`` for numpy scalars/arrays and paths in results files."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
