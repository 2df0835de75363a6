"""Quality benchmark: FedProxy vs Offsite-Tuning vs FedAvg vs centralized LoRA, measured so that a
label prior cannot pass for learning.

Every method scores the same fixed test split (``--limit-test`` per task, split seed 0); training
(LoRA init, client sampling) varies with ``--seeds``. Each (setting, method, seed) is one *cell*
cached as ``OUT/cells/<setting>__<method>__s<seed>.json`` holding its per-example prediction rows
(resumable). ``OUT/predictions.jsonl`` gathers every row; ``OUT/results.json`` is computed from it
alone by :func:`fedproxy_secure.eval.summarise_predictions` (balanced accuracy per task, macro
headline, seed mean/std, paired stratified bootstrap CIs of the difference to zero-shot and of
recovery = (m - zs) / (centralized - zs)); ``results.md`` and ``quality.png`` present it.

Methods (evaluated on the LLM unless noted):
  zs_llm                   zero-shot LLM (option scores cached, see eval.score_cache)
  zs_proxy                 the untuned BI proxy itself (cached)
  prior_only, chance       baselines from the data alone (see eval.metrics for the rules)
  ot                       Offsite-Tuning: uniform emulator, LoRA on the first/last adapter blocks, FedAvg,
                           adapters written back into the LLM (weight plug-in)
  fedavg                   BI proxy, FedAvg, logit plug-in
  fedproxy                 BI proxy, PCR + H-TIES, logit plug-in
  sa_hties                 BI proxy, PCR + SA-H-TIES over masking secure aggregation, logit plug-in
  fedproxy_dp              ``fedproxy`` with DP-SGD (epsilon 8, delta 1e-5)
  centralized              LoRA on the LLM itself (client trainer's train_centralized), pooled data
Federated methods run the SDK stages (compress, client trainer, aggregators, fusion) through
``simulate.federate`` / ``simulate.fuse_outcome``. ``run_train_size`` measures the centralized gain
against the number of training examples per task.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

ALL_METHODS = ("zs_llm", "zs_proxy", "prior_only", "chance", "ot", "fedavg", "fedproxy", "sa_hties", "fedproxy_dp",
               "centralized_proxy", "centralized")
BASELINES = ("prior_only", "chance")
FEDERATED = ("ot", "fedavg", "fedproxy", "sa_hties", "fedproxy_dp")
#: hetero = one task per client (the paper's setting); iid = pooled and dealt; dir<alpha> = label skew:
#: each (task, gold label) class spread over the clients with Dirichlet(alpha) proportions
SETTINGS = ("hetero", "iid", "dir<alpha>")
# server calibration text no client holds: the vendored skill tasks (vendored:bigbench-skill), for a dev-task federation
DEFAULT_CALIB_TASKS = ("discourse_marker_prediction", "implicatures", "reasoning_about_colored_objects", "ruin_names",
                       "salient_translation_error_detection", "temporal_sequences")
LABELS = {"zs_llm": "zero-shot LLM", "zs_proxy": "proxy (untuned)", "prior_only": "prior-only", "chance": "chance",
          "ot": "Offsite-Tuning", "fedavg": "FedAvg", "fedproxy": "FedProxy", "sa_hties": "SA-H-TIES",
          "fedproxy_dp": "FedProxy+DP", "centralized_proxy": "centralized LoRA on the proxy, plugged in",
          "centralized": "centralized LoRA"}


def _portable_args(a: "QualityArgs") -> dict:
    """The run's arguments for results files (paths made portable: no absolute path of this machine)."""
    from fedproxy_secure.pathnames import portable_path

    return {k: (portable_path(v) if isinstance(v, Path) else v) for k, v in a.__dict__.items() if k != "log"}


def _json_default(o):
    from fedproxy_secure.pipelines.simulate import json_default

    return json_default(o)


@dataclass
class QualityArgs:
    """Every knob of the benchmark (the CLI maps its flags onto this)."""

    llm: Path
    data_dir: Path
    out: Path
    tasks: Sequence[str] | None = None
    clients: int = 8
    rounds: int = 3
    local_steps: int = 8
    batch_size: int = 8
    lr: float = 1e-3
    update_clip_norm: float = 1.0
    lr_schedule: str = "constant"
    server_optimizer: dict = field(default_factory=lambda: {"name": "avgm", "lr": 1.0, "beta1": 0.7})  # the recipe
    val_per_task: int = 0  # > 0: held out of each task's training split; the global proxy is scored on it every round
    centralized_lr: float = 2e-4
    centralized_epochs: int | None = None  # None: match the federation's example budget
    limit_train: int = 100
    limit_test: int = 200
    max_length: int = 256
    methods: Sequence[str] = ALL_METHODS
    settings: Sequence[str] = ("hetero",)
    seeds: Sequence[int] = (0,)
    prompt_format: str = "reference"
    calib_dir: Path | None = None
    calib_tasks: Sequence[str] = DEFAULT_CALIB_TASKS
    keep_ratio: float = 0.5
    distill: bool = False
    distill_steps: int = 0
    fusion: str = "logit"
    fusion_scale: float = 1.0
    lora_r: int = 8
    n_boot: int = 2000
    score_cache: Path | None = None  # default OUT/score_cache.jsonl; share one file between runs to reuse zero-shot scores
    eval_batch_size: int = 16
    device: str = "cpu"
    log: Callable[[str], None] = field(default=print, repr=False)


def _run_config(a: QualityArgs, setting: str, method: str, seed: int):
    """The RunConfig a federated method runs with (validated like any user config)."""
    from fedproxy_secure.config import parse_run_config

    aggregator = {"fedavg": "fedavg", "ot": "fedavg", "fedproxy": "hties", "fedproxy_dp": "hties",
                  "sa_hties": "sa_hties"}.get(method, "fedavg")
    return parse_run_config({
        "name": f"{setting}-{method}", "seed": seed,
        "model": {"llm": str(a.llm)},
        "compress": {"strategy": "uniform" if method == "ot" else "bi", "keep_ratio": a.keep_ratio,
                     "distill": a.distill and method != "ot", "distill_steps": a.distill_steps, "calib_examples": 32},
        "data": {"dir": str(a.data_dir), "tasks": list(a.tasks) if a.tasks else None,
                 "calib_dir": str(a.calib_dir) if a.calib_dir else None, "calib_tasks": list(a.calib_tasks),
                 "partition": "task" if setting == "hetero" else "iid" if setting == "iid" else "dirichlet",
                 **({"dirichlet_alpha": dirichlet_alpha(setting)} if setting.startswith("dir") else {}),
                 "limit_train": a.limit_train,
                 "limit_test": a.limit_test, "max_length": a.max_length},
        "clients": {"count": a.clients}, "rounds": a.rounds,
        "train": {"lr": a.lr, "local_steps": a.local_steps, "batch_size": a.batch_size,
                  "update_clip_norm": a.update_clip_norm, "lr_schedule": a.lr_schedule, "device": a.device},
        "lora": {"r": a.lora_r, "alpha": 2.0 * a.lora_r, "ffa": True},
        "aggregator": {"name": aggregator, "server_optimizer": dict(a.server_optimizer)},
        "secagg": {"mode": "masking" if method == "sa_hties" else "none",
                   **({"threshold": max(2, math.ceil(2 * a.clients / 3))} if method == "sa_hties" else {})},
        "dp": {"enabled": method == "fedproxy_dp", "epsilon": 8.0, "delta": 1e-5},
        "fusion": {"method": a.fusion, "scale": a.fusion_scale},
    })


def load_split(a: QualityArgs, tasks: Sequence[str], limit_train: int | None = None):
    """``(train, test)`` per task in ``a.prompt_format``: a fixed test split (split seed 0, independent of
    the training seeds); training sets are nested (a smaller size is a prefix of a larger one)."""
    from fedproxy_secure.data import load_task, split_task

    train, test = {}, {}
    for t in tasks:
        task = load_task(a.data_dir, t, prompt_format=a.prompt_format)
        train[t], test[t] = split_task(task, a.limit_train if limit_train is None else limit_train, a.limit_test, seed=0)
    return train, test


def hold_out_validation(train: dict, val_per_task: int) -> tuple[dict, dict]:
    """``(train, val)``: the last ``val_per_task`` examples of each task's training split become its
    validation set (clients never train on them; model selection reads only them, never the test split)."""
    if val_per_task <= 0:
        return train, {}
    for t, exs in train.items():
        if len(exs) <= val_per_task:
            from fedproxy_secure.errors import ConfigError

            raise ConfigError(f"--val-per-task {val_per_task}: task {t!r} has only {len(exs)} training examples; "
                              "lower it or raise --limit-train")
    return {t: exs[:-val_per_task] for t, exs in train.items()}, {t: exs[-val_per_task:] for t, exs in train.items()}


def dirichlet_alpha(setting: str) -> float:
    """The α of a ``dir<alpha>`` setting (ConfigError naming --settings otherwise)."""
    from fedproxy_secure.errors import ConfigError

    try:
        alpha = float(setting[3:])
    except ValueError:
        alpha = -1.0
    if not setting.startswith("dir") or not alpha > 0:
        raise ConfigError(f"--settings: {setting!r} is unknown; use hetero, iid or dir<alpha> such as dir0.5")
    return alpha


def client_partition(train: dict, setting: str, n_clients: int, seed: int):
    """Client data and client task names: one task group per client (hetero), pooled and dealt (iid), or
    label skew (``dir<alpha>``: every (task, gold answer) class split over the clients by Dirichlet(α))."""
    from fedproxy_secure.data import partition_by_task, partition_iid
    from fedproxy_secure.data.partition import partition_dirichlet

    tasks = list(train)
    if setting == "hetero":
        client_tasks = partition_by_task(tasks, n_clients)
        return [[ex for t in ts for ex in train[t]] for ts in client_tasks], client_tasks
    pool = [ex for t in tasks for ex in train[t]]
    if setting == "iid":
        data = partition_iid(pool, n_clients, seed=seed)
    else:
        parts = partition_dirichlet([f"{ex.task}:{ex.response}" for ex in pool], n_clients, dirichlet_alpha(setting),
                                    seed=seed, min_per_client=1)
        data = [[pool[i] for i in p] for p in parts]
    return data, [sorted({ex.task for ex in part}) for part in data]


class _Shared:
    """What every cell of one setting shares: LLM, tokenizer, data split, proxies and the score cache."""

    def __init__(self, a: QualityArgs, setting: str, tasks: Sequence[str]):
        from fedproxy_secure.data.resolve import check_disjoint
        from fedproxy_secure.eval.score_cache import ScoreCache
        from fedproxy_secure.pipelines.simulate import load_llm

        check_disjoint(tasks, a.calib_tasks, "--calib-dir")  # server text is never a client task
        self.a, self.setting = a, setting
        self.llm, self.tok, self.llm_hash = load_llm(_run_config(a, setting, "fedavg", 0))
        self.llm.requires_grad_(False)
        train, self.test = load_split(a, tasks)
        self.train, self.val = hold_out_validation(train, a.val_per_task)
        self.test_list = [ex for t in tasks for ex in self.test[t]]
        self.val_list = [ex for t in tasks for ex in self.val.get(t, [])]
        self.calib = [ex.prompt for t in a.calib_tasks
                      for ex in _load_calib(a, t)[:32]]
        self.cache = ScoreCache(a.score_cache or Path(a.out) / "score_cache.jsonl", log=a.log)
        self._proxies: dict[str, object] = {}

    def proxy(self, method: str):
        """The BI proxy (FedProxy, FedAvg) or the uniform OT emulator, compressed once per setting by the SDK."""
        from fedproxy_secure.compress import compress

        kind = "uniform" if method == "ot" else "bi"
        if kind not in self._proxies:
            cfg = _run_config(self.a, self.setting, method, 0)
            p = compress(self.llm, self.tok, self.calib, cfg.compress, progress=False, device=self.a.device)
            p.meta["base_model_hash"] = self.llm_hash
            self._proxies[kind] = p
        return self._proxies[kind]

    def prepared(self, method: str, seed: int):
        from fedproxy_secure.pipelines.simulate import Prepared

        data, client_tasks = client_partition(self.train, self.setting, self.a.clients, seed)
        return Prepared(self.llm, self.tok, self.proxy(method), data, client_tasks, self.test, self.calib, self.llm_hash)

    def cached_scores(self, name: str, model, extra: object = "") -> list[list[float]]:
        from fedproxy_secure.eval import model_logits_fn
        from fedproxy_secure.eval.score_cache import fingerprint

        fp = fingerprint(name, self.llm_hash, extra, self.a.max_length)
        return self.cache.scores(fp, self.a.prompt_format, model_logits_fn(model), self.tok, self.test_list,
                                 batch_size=self.a.eval_batch_size, max_length=self.a.max_length,
                                 device=self.a.device, label=name)

    def scores(self, logits_fn, label: str, examples: Sequence | None = None) -> list[list[float]]:
        """Option scores of ``examples`` (default: the test split) under ``logits_fn``."""
        from fedproxy_secure.eval.score_cache import timed_scores

        return timed_scores(logits_fn, self.tok, self.test_list if examples is None else examples, log=self.a.log,
                            label=label, batch_size=self.a.eval_batch_size, max_length=self.a.max_length,
                            device=self.a.device)

    def val_score(self, model) -> float:
        """Macro balanced accuracy of ``model`` alone on the validation split (never the test split)."""
        from fedproxy_secure.eval import model_logits_fn
        from fedproxy_secure.eval.predictions import rows_for, summarise_predictions

        rows = rows_for("val", 0, self.val_list, self.scores(model_logits_fn(model.eval()), "validation", self.val_list))
        return summarise_predictions(rows, reference="none", upper=None)["methods"]["val"]["headline"]


def _load_calib(a: QualityArgs, task: str):
    """Examples of the server calibration task ``task``: from ``a.calib_dir``, else by the one resolution
    order of :mod:`fedproxy_secure.data.resolve` (the vendored copy first)."""
    from fedproxy_secure.data import load_task
    from fedproxy_secure.data.resolve import resolve_task_dir

    folder = resolve_task_dir([task], a.calib_dir, field="--calib-dir")
    return load_task(folder, task, prompt_format=a.prompt_format).examples


def baseline_scores(method: str, train: dict, test: dict) -> list[list[float]]:
    """Option scores of ``prior_only`` (training majority answer) or ``chance`` for every test example, task order."""
    from fedproxy_secure.eval.metrics import TaskView, chance_scores, prior_only_scores, training_prior

    out: list[list[float]] = []
    for t, exs in test.items():
        view = TaskView(tuple(ex.choices for ex in exs), tuple(ex.answer for ex in exs))
        if method == "chance":
            out += chance_scores(view)
        else:
            out += prior_only_scores(view, training_prior([ex.response for ex in train[t]]))
    return out


def _ot_lora_targets(proxy_model, adapter_blocks: int) -> list[str]:
    """Full module names of the default LoRA targets inside the first/last ``n`` proxy blocks."""
    from fedproxy_secure.lora import default_target_modules
    from fedproxy_secure.models import decoder_blocks

    path, blocks, _ = decoder_blocks(proxy_model)
    n = len(blocks)
    ids = sorted(set(range(adapter_blocks)) | set(range(n - adapter_blocks, n)))
    leaves = set(default_target_modules(proxy_model))
    prefixes = tuple(f"{path}.{j}." for j in ids)
    return sorted(name for name, _ in proxy_model.named_modules()
                  if name.startswith(prefixes) and name.rsplit(".", 1)[-1] in leaves)


def _federated_cell(sh: _Shared, method: str, seed: int, out: Path) -> dict:
    from fedproxy_secure.pipelines.simulate import federate, fuse_outcome

    cfg = _run_config(sh.a, sh.setting, method, seed)
    prep = sh.prepared(method, seed)
    if method == "ot":
        targets = _ot_lora_targets(prep.proxy.model, cfg.compress.ot_adapter_blocks)
        cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"target_modules": targets}),
                                     "fusion": cfg.fusion.model_copy(update={"method": "weight"})})
    on_round = (lambda r, model: {"val_balanced_accuracy": sh.val_score(model)}) if sh.val_list else None
    outcome = federate(cfg, prep, out / "work" / f"{sh.setting}__{method}__s{seed}", log=sh.a.log, on_round=on_round)
    fused = fuse_outcome(cfg, prep, outcome)
    if cfg.fusion.method == "logit":  # same sum as the plug-in, scored with each prompt's KV cache shared by its options
        b = cfg.fusion.logit_beta
        fused.logits_fn.parts = [(prep.llm, 1.0), (outcome.peft_proxy.eval(), b), (prep.proxy.model, -b)]
    eps = [c.get("epsilon") for r in outcome.rounds for c in r["clients"] if c.get("epsilon") is not None]
    from fedproxy_secure.eval import model_logits_fn

    return {"scores": sh.scores(fused.logits_fn, f"{method} seed {seed}"), "fusion": cfg.fusion.method,
            "proxy_scores": sh.scores(model_logits_fn(outcome.peft_proxy.eval()), f"{method} proxy alone seed {seed}"),
            "fusion_info": fused.info, "train_loss": [r["train_loss"] for r in outcome.rounds],
            "curve": round_curve(outcome.rounds), "epsilon_max": max(eps) if eps else None,
            "secure_sum_modes": sorted({s.get("mode") for r in outcome.rounds for s in r.get("secure_sum", [])} - {None})}


def round_curve(rounds: Sequence[dict]) -> list[dict]:
    """Per round: mean training loss, validation balanced accuracy of the global proxy (when measured),
    every client's update norm before clipping, the global norm and the server step."""
    return [{"round": r["round"], "train_loss": r.get("train_loss"),
             "val_balanced_accuracy": (r.get("eval") or {}).get("val_balanced_accuracy"),
             "pre_clip_norms": [c.get("pre_clip_norm") for c in r["clients"] if c.get("pre_clip_norm") is not None],
             "global_norm": r.get("global_norm"), "server_step": r.get("server_step"), "seconds": r.get("seconds")}
            for r in rounds]


def centralized_budget_epochs(a: QualityArgs, n_pooled: int) -> int:
    """Epochs that give centralized LoRA the federation's example budget (at least one)."""
    if a.centralized_epochs:
        return a.centralized_epochs
    budget = a.clients * a.rounds * a.local_steps * a.batch_size
    return max(1, round(budget / max(1, n_pooled)))


def _centralized_cell(sh: _Shared, seed: int, train: dict | None = None) -> dict:
    from fedproxy_secure.client.trainer import train_centralized
    from fedproxy_secure.config import LoraConfig
    from fedproxy_secure.eval import model_logits_fn

    a = sh.a
    pooled = [ex for exs in (train or sh.train).values() for ex in exs]
    epochs = centralized_budget_epochs(a, len(pooled))
    res = train_centralized(copy.deepcopy(sh.llm).requires_grad_(False), sh.tok, pooled, epochs=epochs,
                            lr=a.centralized_lr, batch_size=a.batch_size, max_length=a.max_length,
                            device=a.device, lora_cfg=LoraConfig(r=a.lora_r, alpha=2.0 * a.lora_r, ffa=False), seed=seed)
    a.log(f"centralized: {res['steps']} steps on {len(pooled)} examples in {res['seconds']:.0f} s")
    return {"scores": sh.scores(model_logits_fn(res["model"]), f"centralized seed {seed}"), "epochs": epochs,
            "steps": res["steps"], "train_loss": res["train_loss"], "train_seconds": round(res["seconds"], 1),
            "n_train": len(pooled), "lr": a.centralized_lr, "batch_size": a.batch_size, "lora_r": a.lora_r}


def _centralized_proxy_cell(sh: _Shared, seed: int) -> dict:
    """LoRA on the proxy with every client's data pooled (the federation's budget), scored alone and
    through the logit plug-in: the stage-ii upper bound and the stage-iii transfer without federation."""
    from fedproxy_secure.client.trainer import train_centralized
    from fedproxy_secure.config import LoraConfig
    from fedproxy_secure.eval import model_logits_fn
    from fedproxy_secure.fuse.logit import logit_plugin_fn

    a = sh.a
    pooled = [ex for exs in sh.train.values() for ex in exs]
    epochs = centralized_budget_epochs(a, len(pooled))
    base = sh.proxy("fedavg").model
    res = train_centralized(copy.deepcopy(base).requires_grad_(False), sh.tok, pooled, epochs=epochs,
                            lr=a.centralized_lr, batch_size=a.batch_size, max_length=a.max_length,
                            device=a.device, lora_cfg=LoraConfig(r=a.lora_r, alpha=2.0 * a.lora_r, ffa=False), seed=seed)
    a.log(f"centralized on the proxy: {res['steps']} steps on {len(pooled)} examples in {res['seconds']:.0f} s")
    tuned = res["model"].eval()
    fn = logit_plugin_fn(sh.llm, tuned, base, beta=1.0)
    fn.parts = [(sh.llm, 1.0), (tuned, 1.0), (base, -1.0)]
    return {"scores": sh.scores(fn, f"centralized_proxy seed {seed}"),
            "proxy_scores": sh.scores(model_logits_fn(tuned), f"centralized_proxy alone seed {seed}"),
            "epochs": epochs, "steps": res["steps"], "train_loss": res["train_loss"],
            "train_seconds": round(res["seconds"], 1), "n_train": len(pooled), "lr": a.centralized_lr}


def _train_size_cell(a: QualityArgs, out: Path, seed: int) -> dict | None:
    """The train-size run's centralized cell for ``a.limit_train`` and ``seed`` in the same folder, if it
    is the same training (same epochs and pooled examples; lr, batch and rank where the cell records
    them), relabelled ``centralized``; else None. The two commands may share one ``--out`` so the
    headline table does not train the same LoRA twice."""
    f = out / "cells" / f"centralized_n{a.limit_train}__s{seed}.json"
    if not f.is_file():
        return None
    cell = json.loads(f.read_text())
    n_train = cell.get("n_train")
    if n_train is None or cell.get("epochs") != centralized_budget_epochs(a, n_train):
        return None
    for key, want in (("lr", a.centralized_lr), ("batch_size", a.batch_size), ("lora_r", a.lora_r)):
        if key in cell and cell[key] != want:
            return None
    rows = [r | {"method": "centralized"} for r in cell["rows"]]
    return {k: v for k, v in cell.items() if k not in ("rows", "short_tasks")} | {
        "rows": rows, "reused_from": f.name}


def run_cell(sh: _Shared, method: str, seed: int, out: Path) -> dict:
    """One (setting, method, seed) cell: its prediction rows and what else it measured."""
    from fedproxy_secure.eval.predictions import rows_for

    torch.manual_seed(seed)
    t0 = time.time()
    if method == "zs_llm":
        res = {"scores": sh.cached_scores("llm", sh.llm)}
    elif method == "zs_proxy":
        p = sh.proxy("fedavg")
        res = {"scores": sh.cached_scores("proxy", p.model, p.meta["layer_map"])}
    elif method in BASELINES:
        res = {"scores": baseline_scores(method, sh.train, sh.test)}
    elif method == "centralized":
        res = _centralized_cell(sh, seed)
    elif method == "centralized_proxy":
        res = _centralized_proxy_cell(sh, seed)
    else:
        res = _federated_cell(sh, method, seed, out)
    rows = rows_for(method, seed, sh.test_list, res.pop("scores"))
    if "proxy_scores" in res:  # the tuned proxy alone: the stage decomposition's stage-ii numerator
        from fedproxy_secure.eval.decomposition import proxy_name

        rows += rows_for(proxy_name(method), seed, sh.test_list, res.pop("proxy_scores"))
    return {"setting": sh.setting, "method": method, "seed": seed, "seconds": round(time.time() - t0, 1), **res,
            "rows": rows}


def _seeds_for(method: str, seeds: Sequence[int]) -> list[int]:
    """Deterministic methods (no training) run once, as seed ``seeds[0]``."""
    return list(seeds) if method not in ("zs_llm", "zs_proxy", *BASELINES) else [seeds[0]]


def fmt_pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def fmt_ci(ci: Sequence[float] | None, scale: float = 100.0, nd: int = 1) -> str:
    if not ci or any(c is None or math.isnan(c) for c in ci):
        return ""
    return f" [{scale * ci[0]:.{nd}f}, {scale * ci[1]:.{nd}f}]"


def write_markdown(a: QualityArgs, summaries: dict[str, dict], path: Path, cells_info: dict) -> None:
    """One table per setting: per-task balanced accuracy, headline with CI, seed spread, difference and recovery with CIs."""
    lines = ["# Quality benchmark", "",
             f"LLM `{Path(a.llm).name}`, data `{Path(a.data_dir).name}` ({a.prompt_format} prompt format); {a.clients} clients, "
             f"{a.rounds} rounds x {a.local_steps} local steps x batch {a.batch_size}; {a.limit_train} train per task; "
             f"seeds {', '.join(map(str, a.seeds))}; federated methods use the {a.fusion} plug-in (OT: weight write-back).",
             "Cells: balanced accuracy (%) per task (mean recall per gold label; accuracy for tasks whose options change "
             "per example, marked *). Headline = macro mean of balanced accuracy with its paired stratified bootstrap "
             f"95% CI ({'B=' + str(next(iter(summaries.values()))['n_boot']) if summaries else ''}); "
             "Δ zs and recovery = (m − zs)/(centralized − zs) with their paired CIs; ± = std over seeds.", ""]
    for setting, s in summaries.items():
        tasks = list(s["n_per_task"])
        head = [t + ("" if s["fixed_label"][t] else "*") for t in tasks]
        lines += [f"## {setting}", "",
                  "| method | " + " | ".join(head) + " | headline [95% CI] | ± seeds | macro acc | Δ zs [95% CI] | recovery [95% CI] |",
                  "|---|" + "---|" * (len(tasks) + 5),
                  "| n (test) | " + " | ".join(str(s["n_per_task"][t]) for t in tasks) + " | | | | | |"]
        for m in [x for x in ALL_METHODS if x in s["methods"]]:
            r = s["methods"][m]
            rec = r.get("ratio")
            rec_s = "-" if rec is None or m in ("zs_llm", "centralized") else f"{rec:.2f}{fmt_ci(r.get('ratio_ci'), 1.0, 2)}"
            lines.append(
                f"| {LABELS.get(m, m)} | " + " | ".join(fmt_pct(r["per_task"][t]["balanced_accuracy"]) for t in tasks)
                + f" | **{fmt_pct(r['headline'])}**{fmt_ci(r.get('headline_ci'))} | "
                + (f"{100 * r['seed_std']:.1f} (n={len(r['seeds'])})" if len(r["seeds"]) > 1 else "-")
                + f" | {fmt_pct(r['macro_accuracy'])} | "
                + ("-" if m == "zs_llm" or "diff_ci" not in r else f"{100 * r['diff_to_reference']:+.1f}{fmt_ci(r['diff_ci'])}")
                + f" | {rec_s} |")
        lines.append("")
    if cells_info:
        lines += ["## Cells", "", "| setting | method | seed | seconds | notes |", "|---|---|---|---|---|"]
        for (st, m, sd), c in sorted(cells_info.items()):
            notes = []
            if c.get("epsilon_max") is not None:
                notes.append(f"ε max {c['epsilon_max']:.2f}")
            if c.get("steps") is not None:
                notes.append(f"{c['steps']} steps, {c.get('epochs')} epochs on {c.get('n_train')} examples")
            if c.get("secure_sum_modes"):
                notes.append("secure sum: " + ",".join(c["secure_sum_modes"]))
            lines.append(f"| {st} | {m} | {sd} | {c.get('seconds')} | {'; '.join(notes)} |")
    path.write_text("\n".join(lines) + "\n")


def plot(summaries: dict[str, dict], out: Path, title: str = "Macro balanced accuracy per method") -> Path:
    """quality.png: headline per method with 95% CI error bars (y-axis zoomed to the data, not from 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    settings = list(summaries)
    width = 0.8 / max(1, len(settings))
    methods = [m for m in ALL_METHODS if any(m in s["methods"] for s in summaries.values())]
    lo_all, hi_all = [], []
    for i, st in enumerate(settings):
        ms = summaries[st]["methods"]
        y = np.array([100 * ms[m]["headline"] if m in ms else np.nan for m in methods])
        ci = [ms[m].get("headline_ci", [ms[m]["headline"]] * 2) if m in ms else [np.nan, np.nan] for m in methods]
        lo = y - 100 * np.array([c[0] for c in ci])
        hi = 100 * np.array([c[1] for c in ci]) - y
        ax.errorbar(np.arange(len(methods)) + i * width, y, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], fmt="o",
                    capsize=4, label=st)
        lo_all.append(np.nanmin(y - lo))
        hi_all.append(np.nanmax(y + hi))
    ax.set_xticks(np.arange(len(methods)) + width * (len(settings) - 1) / 2, [LABELS.get(m, m) for m in methods],
                  rotation=25, ha="right")
    ax.set_ylim(min(lo_all) - 2, max(hi_all) + 2)
    ax.set_ylabel("macro balanced accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="setting")
    ax.set_title(title + " (95% bootstrap CI)")
    fig.tight_layout()
    path = out / "quality.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _check(a: QualityArgs) -> None:
    from fedproxy_secure.data.bigbench import PROMPT_FORMATS
    from fedproxy_secure.errors import ConfigError

    unknown = [m for m in a.methods if m not in ALL_METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown}; choose from {', '.join(ALL_METHODS)}")
    if not a.seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    if a.prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"--prompt-format: {a.prompt_format!r} is unknown; choose {' or '.join(PROMPT_FORMATS)}")
    for st in a.settings:
        if st not in ("hetero", "iid"):
            dirichlet_alpha(st)


def run_quality(a: QualityArgs) -> dict:
    """Compute every missing cell, then write predictions.jsonl, results.json, results.md and quality.png.

    Returns ``{"settings": {setting: summary}, "args": ...}``; every number in the summaries is
    recomputable from predictions.jsonl with :func:`fedproxy_secure.eval.summarise_predictions`.
    """
    from fedproxy_secure.data import list_tasks
    from fedproxy_secure.eval.decomposition import stage_decomposition
    from fedproxy_secure.eval.predictions import summarise_predictions, write_jsonl

    _check(a)
    out = Path(a.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    tasks = list(a.tasks or list_tasks(a.data_dir))
    a.tasks = tasks
    methods = list(dict.fromkeys([*a.methods, *(m for m in ("zs_llm", *BASELINES) if m not in a.methods)]))
    rows_by_setting: dict[str, list[dict]] = {}
    info: dict = {}
    for setting in a.settings:
        shared = None
        rows_by_setting[setting] = []
        # seed-major: every method at the first seed before any at the next, so a run stopped early
        # still holds a complete table for the seeds it finished
        order = [(m, sd) for sd in a.seeds for m in methods if sd in _seeds_for(m, a.seeds)]
        for method, seed in order:
            f = out / "cells" / f"{setting}__{method}__s{seed}.json"
            if f.is_file():
                cell = json.loads(f.read_text())
                a.log(f"{setting}/{method}/seed {seed}: cached")
            elif method == "centralized" and (reused := _train_size_cell(a, out, seed)) is not None:
                cell = {"setting": setting, "method": method, "seed": seed, **reused}
                f.write_text(json.dumps(cell, default=_json_default))
                a.log(f"{setting}/{method}/seed {seed}: the train-size run's {reused['reused_from']} (same training)")
            else:
                shared = shared or _Shared(a, setting, tasks)
                a.log(f"{setting}/{method}/seed {seed}: running")
                cell = run_cell(shared, method, seed, out)
                f.write_text(json.dumps(cell, default=_json_default))
                a.log(f"{setting}/{method}/seed {seed}: done in {cell['seconds']} s")
            rows_by_setting[setting] += cell["rows"]
            info[(setting, method, seed)] = {k: v for k, v in cell.items() if k != "rows"}
        if shared is not None:
            a.log(f"score cache: {shared.cache.hits} hits, {shared.cache.misses} scored")
    write_jsonl([r | {"setting": s} for s, rows in rows_by_setting.items() for r in rows], out / "predictions.jsonl")
    summaries = {s: summarise_predictions(rows, reference="zs_llm", upper="centralized", n_boot=a.n_boot, seed=0)
                 for s, rows in rows_by_setting.items()}
    federated = [m for m in FEDERATED if m in methods]
    decomposition = {s: stage_decomposition(rows, federated, n_boot=a.n_boot, seed=0) for s, rows in rows_by_setting.items()}
    result = {"settings": summaries, "decomposition": decomposition,
              "cells": [{"setting": k[0], "method": k[1], "seed": k[2], **v} for k, v in info.items()],
              "args": _portable_args(a)}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=_json_default))
    write_markdown(a, summaries, out / "results.md", info)
    with (out / "results.md").open("a") as f:
        f.write(decomposition_markdown(decomposition))
    plot(summaries, out)
    for (setting, method, seed), cell in info.items():
        if cell.get("curve"):
            plot_curve(cell["curve"], out / "curves" / f"{setting}__{method}__s{seed}.png",
                       f"{LABELS.get(method, method)}, {setting}, seed {seed}")
    return result


def decomposition_markdown(decomposition: dict[str, dict]) -> str:
    """The stage decomposition as markdown tables, one per setting (values with 95% CIs)."""
    def cell(r: dict) -> str:
        if r.get("value") is None:
            return "-" if not r.get("missing") else f"- (needs {', '.join(r['missing'])})"
        return f"{r['value']:.2f}{fmt_ci(r.get('ci'), 1.0, 2)}"

    lines = ["", "## Stage decomposition", "",
             "stage-ii efficiency = (m@proxy − zs_proxy)/(centralized_proxy@proxy − zs_proxy); stage-iii transfer = "
             "(centralized_proxy − zs_llm)/(centralized − zs_llm); recovery = (m − zs_llm)/(centralized − zs_llm); "
             "paired bootstrap 95% CIs.", ""]
    for setting, d in decomposition.items():
        lines += [f"### {setting}", "", f"stage-iii transfer (centrally tuned proxy, plugged in): "
                  f"{cell(d['stage_iii_transfer'])}", "",
                  "| method | proxy alone | fused LLM | stage-ii efficiency | recovery |", "|---|---|---|---|---|"]
        heads = d["headlines"]
        for m, r in d["methods"].items():
            lines.append(f"| {LABELS.get(m, m)} | {fmt_pct(heads.get(m + '@proxy'))} | {fmt_pct(heads.get(m))} | "
                         f"{cell(r['stage_ii_efficiency'])} | {cell(r['recovery'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_curve(curve: Sequence[dict], path: Path, title: str) -> Path:
    """One PNG: validation balanced accuracy of the global proxy and mean training loss per round (left),
    every client's update norm before clipping per round (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    rounds = [c["round"] for c in curve]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    val = [c.get("val_balanced_accuracy") for c in curve]
    if any(v is not None for v in val):
        ax.plot(rounds, [100 * v if v is not None else np.nan for v in val], "o-", label="val balanced acc. (%)")
    ax.set_xlabel("round")
    ax.set_ylabel("validation balanced accuracy (%)")
    ax2 = ax.twinx()
    ax2.plot(rounds, [c.get("train_loss") if c.get("train_loss") is not None else np.nan for c in curve], "s--",
             color="tab:grey", label="train loss")
    ax2.set_ylabel("mean train loss")
    ax.set_title("global proxy")
    for c in curve:
        bx.scatter([c["round"]] * len(c["pre_clip_norms"]), c["pre_clip_norms"], s=12, color="tab:blue", alpha=0.6)
    bx.plot(rounds, [np.median(c["pre_clip_norms"]) if c["pre_clip_norms"] else np.nan for c in curve], "-",
            color="tab:blue", label="median")
    bx.set_xlabel("round")
    bx.set_ylabel("client update L2 norm (before clipping)")
    bx.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_train_size(a: QualityArgs, sizes: Sequence[int]) -> dict:
    """Centralized LoRA gain in macro balanced accuracy (with paired 95% CI) per training size per task.

    Uses ``a.seeds`` and ``a.settings[0]``'s LLM; training sets are nested prefixes of the largest one,
    the test split is fixed. Writes ``train_size.json``, ``train_size.md``, ``predictions.jsonl`` and
    ``train_size.png`` in ``a.out``; returns the summary.
    """
    from fedproxy_secure.data import list_tasks
    from fedproxy_secure.eval.predictions import rows_for, summarise_predictions, write_jsonl

    _check(a)
    out = Path(a.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    tasks = list(a.tasks or list_tasks(a.data_dir))
    a.tasks = tasks
    sh = _Shared(a, a.settings[0], tasks)
    rows = rows_for("zs_llm", a.seeds[0], sh.test_list, sh.cached_scores("llm", sh.llm))
    rows += rows_for("prior_only", a.seeds[0], sh.test_list, baseline_scores("prior_only", sh.train, sh.test))
    rows += rows_for("chance", a.seeds[0], sh.test_list, baseline_scores("chance", sh.train, sh.test))
    info = {}
    for n in sizes:
        train, _ = load_split(a, tasks, limit_train=n)
        short = {t: len(v) for t, v in train.items() if len(v) < n}
        if short:
            a.log(f"size {n}: tasks with fewer training examples: {short}")
        for seed in a.seeds:
            f = out / "cells" / f"centralized_n{n}__s{seed}.json"
            if f.is_file():
                cell = json.loads(f.read_text())
            else:
                t0 = time.time()
                res = _centralized_cell(sh, seed, train)
                cell = {"rows": rows_for(f"centralized_n{n}", seed, sh.test_list, res.pop("scores")), **res,
                        "seconds": round(time.time() - t0, 1), "short_tasks": short}
                f.write_text(json.dumps(cell, default=_json_default))
            rows += cell["rows"]
            info[f"{n}/{seed}"] = {k: v for k, v in cell.items() if k != "rows"}
    write_jsonl(rows, out / "predictions.jsonl")
    s = summarise_predictions(rows, reference="zs_llm", upper=None, n_boot=a.n_boot, seed=0)
    table = []
    for n in sizes:
        r = s["methods"][f"centralized_n{n}"]
        table.append({"train_per_task": n, "headline": r["headline"], "gain": r["diff_to_reference"],
                      "gain_ci": r["diff_ci"], "seed_std": r["seed_std"],
                      "significant_5pt": bool(r["diff_to_reference"] >= 0.05 and r["diff_ci"][0] > 0)})
    result = {"sizes": table, "summary": s, "cells": info,
              "args": _portable_args(a)}
    (out / "train_size.json").write_text(json.dumps(result, indent=2, default=_json_default))
    zs, po, ch = (s["methods"][m] for m in ("zs_llm", "prior_only", "chance"))
    tasks_h = list(s["n_per_task"])
    lines = ["# Centralized LoRA gain vs training size", "",
             f"LLM `{Path(a.llm).name}`, data `{Path(a.data_dir).name}` ({a.prompt_format} format), lr {a.centralized_lr}, "
             f"batch {a.batch_size}, seeds {', '.join(map(str, a.seeds))}. Balanced accuracy (%) per task; gain = "
             "headline − zero-shot with its paired stratified bootstrap 95% CI.", "",
             "| method | " + " | ".join(tasks_h) + " | headline | gain [95% CI] |", "|---|" + "---|" * (len(tasks_h) + 2),
             "| n (test) | " + " | ".join(str(s["n_per_task"][t]) for t in tasks_h) + " | | |"]
    for name, r in [("chance", ch), ("prior-only", po), ("zero-shot LLM", zs)] + [
            (f"centralized, {n}/task", s["methods"][f"centralized_n{n}"]) for n in sizes]:
        gain = "-" if name == "zero-shot LLM" else f"{100 * r['diff_to_reference']:+.1f}{fmt_ci(r['diff_ci'])}"
        lines.append(f"| {name} | " + " | ".join(fmt_pct(r["per_task"][t]["balanced_accuracy"]) for t in tasks_h)
                     + f" | **{fmt_pct(r['headline'])}** | {gain} |")
    (out / "train_size.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    g = np.array([100 * r["gain"] for r in table])
    lo = g - np.array([100 * r["gain_ci"][0] for r in table])
    hi = np.array([100 * r["gain_ci"][1] for r in table]) - g
    ax.errorbar([r["train_per_task"] for r in table], g, yerr=[lo, hi], fmt="o-", capsize=4)
    ax.axhline(0, color="grey", ls=":")
    ax.axhline(5, color="tab:red", ls="--", lw=0.8, label="5 points")
    ax.set_xscale("log")
    ax.set_xlabel("training examples per task")
    ax.set_ylabel("centralized gain in macro balanced acc. (points)")
    ax.legend()
    ax.set_title("Centralized LoRA gain vs training size (95% CI)")
    fig.tight_layout()
    fig.savefig(out / "train_size.png", dpi=120)
    plt.close(fig)
    return result
