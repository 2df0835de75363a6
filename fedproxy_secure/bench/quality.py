"""Quality benchmark: FedProxy vs Offsite-Tuning vs FedAvg vs centralized LoRA, on the same data and budget.

For each setting (``hetero``: one task per client; ``iid``: pooled data dealt evenly) and each
method, one *cell* is computed and cached as ``OUT/cells/<setting>__<method>.json`` (the benchmark
is resumable: finished cells are skipped). Then ``OUT/results.json``, ``OUT/results.md`` and
``OUT/accuracy.png`` / ``OUT/rounds.png`` summarise every cell.

Methods (all evaluated on the LLM, except ``zs_proxy``):
  zs_llm, zs_proxy         zero-shot
  ot                       Offsite-Tuning: uniform emulator, LoRA on the first/last n adapter blocks
                           only, FedAvg, adapters plugged into the LLM (weight plug-in, always)
  fedavg                   BI proxy, FedAvg, plug-in fusion
  fedproxy                 BI proxy, PCR + H-TIES, plug-in fusion
  sa_hties                 BI proxy, PCR + SA-H-TIES over masking secure aggregation, plug-in fusion
  fedproxy_dp              ``fedproxy`` with DP-SGD (epsilon 8, delta 1e-5, PRV accountant)
  centralized              LoRA on the LLM itself, pooled data (the upper bound)
Client compute is the same for every federated method (rounds x local steps x batch size per
client); ``centralized`` sees the same number of training examples in total.
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

from fedproxy_secure.simulate import json_default

ALL_METHODS = ("zs_llm", "zs_proxy", "ot", "fedavg", "fedproxy", "sa_hties", "fedproxy_dp", "centralized")
SETTINGS = ("hetero", "iid")
DEFAULT_CALIB_TASKS = ("date_understanding", "hyperbaton", "causal_judgment", "anachronisms", "disambiguation_qa")


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
    centralized_lr: float = 2e-4
    limit_train: int = 100
    limit_test: int = 50
    max_length: int = 256
    methods: Sequence[str] = ALL_METHODS
    settings: Sequence[str] = SETTINGS
    calib_dir: Path | None = None
    calib_tasks: Sequence[str] = DEFAULT_CALIB_TASKS
    keep_ratio: float = 0.5
    distill: bool = False
    distill_steps: int = 0
    fusion: str = "logit"  # the headline plug-in; DESIGN measured transfer 0.73 (logit) vs 0.13 (weight)
    extra_fusions: Sequence[str] = ("weight",)  # also evaluated for every federated method
    fusion_scale: float = 1.0
    lora_r: int = 8
    curve_methods: Sequence[str] = ("fedproxy",)
    device: str = "cpu"
    seed: int = 0
    log: Callable[[str], None] = field(default=print, repr=False)


def _run_config(a: QualityArgs, setting: str, method: str):
    """The RunConfig a federated method runs with (validated like any user config)."""
    from fedproxy_secure.config import parse_run_config

    aggregator = {"fedavg": "fedavg", "ot": "fedavg", "fedproxy": "hties", "fedproxy_dp": "hties",
                  "sa_hties": "sa_hties"}[method]
    return parse_run_config({
        "name": f"{setting}-{method}", "seed": a.seed,
        "model": {"llm": str(a.llm)},
        "compress": {"strategy": "uniform" if method == "ot" else "bi", "keep_ratio": a.keep_ratio,
                     "distill": a.distill and method != "ot", "distill_steps": a.distill_steps, "calib_examples": 32},
        "data": {"dir": str(a.data_dir), "tasks": list(a.tasks) if a.tasks else None,
                 "calib_dir": str(a.calib_dir) if a.calib_dir else None, "calib_tasks": list(a.calib_tasks),
                 "partition": "task" if setting == "hetero" else "iid", "limit_train": a.limit_train,
                 "limit_test": a.limit_test, "max_length": a.max_length},
        "clients": {"count": a.clients}, "rounds": a.rounds,
        "train": {"lr": a.lr, "local_steps": a.local_steps, "batch_size": a.batch_size, "update_clip_norm": 1.0,
                  "device": a.device},
        "lora": {"r": a.lora_r, "alpha": 2.0 * a.lora_r, "ffa": True},
        "aggregator": {"name": aggregator},
        "secagg": {"mode": "masking" if method == "sa_hties" else "none",
                   **({"threshold": max(2, math.ceil(2 * a.clients / 3))} if method == "sa_hties" else {})},
        "dp": {"enabled": method == "fedproxy_dp", "epsilon": 8.0, "delta": 1e-5},
        "fusion": {"method": a.fusion, "scale": a.fusion_scale},
    })


class _Shared:
    """What every cell of one setting shares: the LLM, tokenizer, data split and the two proxies."""

    def __init__(self, a: QualityArgs, setting: str):
        from fedproxy_secure.simulate import load_llm, split_data

        self.a, self.setting = a, setting
        base = _run_config(a, setting, "fedavg")
        self.llm, self.tok, self.llm_hash = load_llm(base)
        self.llm.requires_grad_(False)
        self.client_data, self.client_tasks, self.test_sets, self.calib = split_data(base)
        self._proxies: dict[str, object] = {}

    def proxy(self, method: str):
        """The BI proxy (FedProxy, FedAvg) or the uniform OT emulator, compressed once per setting."""
        from fedproxy_secure.compress import compress

        kind = "uniform" if method == "ot" else "bi"
        if kind not in self._proxies:
            cfg = _run_config(self.a, self.setting, method)
            p = compress(self.llm, self.tok, self.calib, cfg.compress, progress=False, device=self.a.device)
            p.meta["base_model_hash"] = self.llm_hash
            self._proxies[kind] = p
        return self._proxies[kind]

    def prepared(self, method: str):
        from fedproxy_secure.simulate import Prepared

        return Prepared(self.llm, self.tok, self.proxy(method), self.client_data, self.client_tasks,
                        self.test_sets, self.calib, self.llm_hash)

    def evaluate(self, logits_fn) -> dict:
        from fedproxy_secure.eval import evaluate_tasks

        return evaluate_tasks(logits_fn, self.tok, self.test_sets, batch_size=16, max_length=self.a.max_length,
                              device=self.a.device).to_dict()


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


def _federated_cell(sh: _Shared, method: str, out: Path) -> dict:
    from fedproxy_secure.eval import model_logits_fn
    from fedproxy_secure.simulate import federate, fuse_outcome

    a = sh.a
    cfg = _run_config(a, sh.setting, method)
    prep = sh.prepared(method)
    if method == "ot":
        targets = _ot_lora_targets(prep.proxy.model, cfg.compress.ot_adapter_blocks)
        cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"target_modules": targets})})
    on_round = None
    if method in a.curve_methods:
        def on_round(r: int, peft_proxy) -> dict:
            from fedproxy_secure.simulate import FederationOutcome

            fused = fuse_outcome(cfg, prep, FederationOutcome(theta=None, peft_proxy=peft_proxy))
            return {"llm_mean_accuracy": sh.evaluate(fused.logits_fn)["mean_accuracy"]}
    outcome = federate(cfg, prep, out / "work" / f"{sh.setting}__{method}", log=a.log, on_round=on_round)
    by_fusion, infos = {}, {}
    headline = "weight" if method == "ot" else a.fusion  # Offsite-Tuning's own plug-in writes adapters back
    for fusion in dict.fromkeys([headline, a.fusion, *a.extra_fusions]):
        cfg_f = cfg.model_copy(update={"fusion": cfg.fusion.model_copy(update={"method": fusion})})
        fused = fuse_outcome(cfg_f, prep, outcome)
        by_fusion[fusion], infos[fusion] = sh.evaluate(fused.logits_fn), fused.info
    return {
        "llm": by_fusion[headline],
        "llm_by_fusion": by_fusion,
        "proxy_after": sh.evaluate(model_logits_fn(outcome.peft_proxy)),
        "rounds": outcome.rounds,
        "fusion": {"method": headline, "info": infos},
        "proxy_meta": {k: v for k, v in prep.proxy.meta.items() if k != "bi_scores"},
    }


def _centralized_cell(sh: _Shared) -> dict:
    from fedproxy_secure.client.trainer import train_centralized
    from fedproxy_secure.config import LoraConfig
    from fedproxy_secure.eval import model_logits_fn

    a = sh.a
    pooled = [ex for part in sh.client_data for ex in part]
    budget = a.clients * a.rounds * a.local_steps * a.batch_size  # examples processed by the federation
    epochs = max(1, round(budget / max(1, len(pooled))))
    res = train_centralized(copy.deepcopy(sh.llm).requires_grad_(False), sh.tok, pooled, epochs=epochs,
                            lr=a.centralized_lr, batch_size=a.batch_size, max_length=a.max_length,
                            device=a.device, lora_cfg=LoraConfig(r=a.lora_r, alpha=2.0 * a.lora_r, ffa=False),
                            seed=a.seed)
    return {"llm": sh.evaluate(model_logits_fn(res["model"])), "epochs": epochs, "steps": res["steps"],
            "train_loss": res["train_loss"], "lr": a.centralized_lr}


def run_cell(sh: _Shared, method: str, out: Path) -> dict:
    """Compute one (setting, method) cell; pure in its inputs apart from timing."""
    from fedproxy_secure.eval import model_logits_fn

    torch.manual_seed(sh.a.seed)
    t0 = time.time()
    if method == "zs_llm":
        res = {"llm": sh.evaluate(model_logits_fn(sh.llm))}
    elif method == "zs_proxy":
        res = {"llm": sh.evaluate(model_logits_fn(sh.proxy("fedavg").model)), "note": "accuracy of the proxy itself"}
    elif method == "centralized":
        res = _centralized_cell(sh)
    else:
        res = _federated_cell(sh, method, out)
    res.update({"setting": sh.setting, "method": method, "seconds": round(time.time() - t0, 1)})
    return res


def task_groups(data_dir: Path, tasks: Sequence[str]) -> dict[str, list[str]]:
    """Group tasks by answer format (no task names involved): binary (QA-like) vs >= 3 labels."""
    from fedproxy_secure.data import load_task

    groups: dict[str, list[str]] = {"qa_like": [], "classification": []}
    for t in tasks:
        n = max(len(ex.choices) for ex in load_task(data_dir, t).examples)
        groups["classification" if n >= 3 else "qa_like"].append(t)
    return groups


def summarise(a: QualityArgs, cells: dict[tuple[str, str], dict], groups: dict[str, list[str]]) -> dict:
    """Means per group, recovery and gap closed over OT for every method of every setting."""
    out: dict = {"settings": {}}
    for setting in a.settings:
        rows = {m: c for (s, m), c in cells.items() if s == setting}
        zs = rows.get("zs_llm", {}).get("llm", {}).get("mean_accuracy")
        cen = rows.get("centralized", {}).get("llm", {}).get("mean_accuracy")
        ot = rows.get("ot", {}).get("llm", {}).get("mean_accuracy")
        table = {}
        for m, c in rows.items():
            per = c["llm"]["per_task"]
            mean = c["llm"]["mean_accuracy"]
            row = {"per_task": per, "mean": mean, "seconds": c.get("seconds")}
            for g, ts in groups.items():
                vals = [per[t] for t in ts if t in per]
                row[f"{g}_mean"] = float(np.mean(vals)) if vals else None
            if zs is not None and cen is not None and abs(cen - zs) > 1e-9:
                row["recovery"] = (mean - zs) / (cen - zs)
            if ot is not None and cen is not None and (cen - ot) >= 0.02:
                row["gap_closed_over_ot"] = (mean - ot) / (cen - ot)
            if "rounds" in c:
                row["curve"] = [r.get("eval", {}).get("llm_mean_accuracy") for r in c["rounds"]]
                eps = [cl.get("epsilon") for r in c["rounds"] for cl in r["clients"] if cl.get("epsilon") is not None]
                if eps:
                    row["epsilon_max"] = max(eps)
            if "proxy_after" in c:
                row["proxy_after_mean"] = c["proxy_after"]["mean_accuracy"]
            for fusion, ev in c.get("llm_by_fusion", {}).items():
                row[f"mean_{fusion}_plugin"] = ev["mean_accuracy"]
                if zs is not None and cen is not None and abs(cen - zs) > 1e-9:
                    row[f"recovery_{fusion}_plugin"] = (ev["mean_accuracy"] - zs) / (cen - zs)
            table[m] = row
        out["settings"][setting] = {"methods": table, "zs_llm": zs, "centralized": cen, "ot": ot}
        sa, hp = table.get("sa_hties"), table.get("fedproxy")
        if sa and hp:
            out["settings"][setting]["sa_hties_minus_hties_points"] = 100 * (sa["mean"] - hp["mean"])
        dp = table.get("fedproxy_dp")
        if dp and hp:
            out["settings"][setting]["dp_cost_points"] = 100 * (hp["mean"] - dp["mean"])
    return out


def write_markdown(a: QualityArgs, summary: dict, groups: dict[str, list[str]], path: Path) -> None:
    """A markdown table per setting: per task, group means, overall, recovery, gap closed over OT."""
    lines = ["# Quality benchmark", "",
             f"LLM `{a.llm}`" + (" (weights dequantised from a quantised GGUF)" if (Path(a.llm) / "import.json").is_file() else "")
             + f", data `{a.data_dir}`; "
             f"{a.clients} clients, {a.rounds} rounds x {a.local_steps} local steps x batch {a.batch_size}; "
             f"{a.limit_train} train / {a.limit_test} test examples per task; seed {a.seed}.",
             f"QA-like = binary tasks ({', '.join(groups['qa_like'])}); classification = tasks with >= 3 labels "
             f"({', '.join(groups['classification'])}).", ""]
    for setting, s in summary["settings"].items():
        methods = [m for m in ALL_METHODS if m in s["methods"]]
        tasks = list(next(iter(s["methods"].values()))["per_task"]) if methods else []
        extra = [f for f in a.extra_fusions if f != a.fusion]
        lines += [f"## {setting}", "", f"Federated methods use the {a.fusion} plug-in (OT: its adapter write-back); the last columns give the "
                  + ", ".join(extra) + " plug-in of the same global LoRA." if extra else f"## {setting}", "",
                  "| method | " + " | ".join(tasks) + " | QA-like | classif. | overall | recovery | gap closed over OT | "
                  + " | ".join(f"{f} plug-in (recovery)" for f in extra) + " | proxy after |",
                  "|---|" + "---|" * (len(tasks) + 6 + len(extra))]
        for m in methods:
            r = s["methods"][m]
            f = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
            g = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
            lines.append(f"| {m} | " + " | ".join(f(r["per_task"].get(t)) for t in tasks)
                         + f" | {f(r.get('qa_like_mean'))} | {f(r.get('classification_mean'))} | **{f(r['mean'])}** | "
                         f"{g(r.get('recovery'))} | {g(r.get('gap_closed_over_ot'))} | "
                         + " | ".join(f"{f(r.get(f'mean_{x}_plugin'))} ({g(r.get(f'recovery_{x}_plugin'))})" for x in extra)
                         + f" | {f(r.get('proxy_after_mean'))} |")
        for k in ("sa_hties_minus_hties_points", "dp_cost_points"):
            if k in s:
                lines.append(f"\n{k.replace('_', ' ')}: {s[k]:+.1f}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def plot(summary: dict, out: Path) -> list[Path]:
    """accuracy.png (bars per method and setting) and rounds.png (LLM accuracy after each round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    settings = list(summary["settings"])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(settings))
    methods = [m for m in ALL_METHODS if any(m in s["methods"] for s in summary["settings"].values())]
    for i, s in enumerate(settings):
        vals = [100 * summary["settings"][s]["methods"].get(m, {}).get("mean", float("nan")) for m in methods]
        ax.bar(np.arange(len(methods)) + i * width, vals, width, label=s)
    ax.set_xticks(np.arange(len(methods)) + width * (len(settings) - 1) / 2, methods, rotation=20)
    ax.set_ylabel("mean accuracy (%)")
    ax.legend()
    ax.set_title("LLM accuracy per method")
    fig.tight_layout()
    files.append(out / "accuracy.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in settings:
        for m, r in summary["settings"][s]["methods"].items():
            curve = [c for c in r.get("curve", []) if c is not None]
            if curve:
                ax.plot(range(1, len(curve) + 1), [100 * c for c in curve], marker="o", label=f"{m} ({s})")
        zs = summary["settings"][s]["zs_llm"]
        if zs is not None:
            ax.axhline(100 * zs, ls=":", color="grey")
    ax.set_xlabel("round")
    ax.set_ylabel("fused LLM mean accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / "rounds.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


def run_quality(a: QualityArgs) -> dict:
    """Compute every missing cell, then write results.json, results.md and the plots; return the summary."""
    from fedproxy_secure.data import list_tasks

    unknown = [m for m in a.methods if m not in ALL_METHODS]
    if unknown:
        from fedproxy_secure.errors import ConfigError

        raise ConfigError(f"--methods: unknown {unknown}; choose from {', '.join(ALL_METHODS)}")
    out = Path(a.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    tasks = list(a.tasks or list_tasks(a.data_dir))
    a.tasks = tasks
    cells: dict[tuple[str, str], dict] = {}
    for setting in a.settings:
        shared = None
        for method in a.methods:
            f = out / "cells" / f"{setting}__{method}.json"
            if f.is_file():
                cells[(setting, method)] = json.loads(f.read_text())
                a.log(f"{setting}/{method}: cached")
                continue
            shared = shared or _Shared(a, setting)
            a.log(f"{setting}/{method}: running")
            cell = run_cell(shared, method, out)
            f.write_text(json.dumps(cell, indent=1, default=json_default))
            cells[(setting, method)] = cell
            a.log(f"{setting}/{method}: mean {100 * cell['llm']['mean_accuracy']:.1f}% in {cell['seconds']} s")
    groups = task_groups(a.data_dir, tasks)
    summary = summarise(a, cells, groups)
    summary["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in a.__dict__.items() if k != "log"}
    summary["groups"] = groups
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=json_default))
    write_markdown(a, summary, groups, out / "results.md")
    plot(summary, out)
    return summary

