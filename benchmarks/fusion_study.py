"""Fusion study: centralized LoRA on a proxy, then every plug-in variant side by side, through the SDK.

Every building block is the shipped one: compression, Block Influence and distillation from
``fedproxy_secure.compress``, LoRA training from ``fedproxy_secure.client.trainer.train_centralized``,
fusion from ``fedproxy_secure.fuse``, scoring and metrics from ``fedproxy_secure.eval``. For each
variant the study stores per-example predictions of the fused LLM (and of the tuned proxy) and
reports macro balanced accuracy and transfer = (fused − zero-shot LLM) / (LLM LoRA − zero-shot LLM)
with paired stratified bootstrap 95% CIs (:func:`fedproxy_secure.eval.summarise_predictions`).
Resumable: each variant's predictions are cached in ``out/variants`` and each trained adapter in
``out/adapters``. Server data (calibration, distillation, scale search) comes from BIG-bench tasks
that are NOT among the evaluation tasks; client (train) and test data are never used for it.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedproxy_secure.data import list_tasks, load_task, split_task
from fedproxy_secure.errors import DataError

#: server-side text by default: the vendored skill tasks (no evaluation task is among them)
DEFAULT_SERVER_DIR = "vendored:bigbench-skill"
ALL_VARIANTS = ("zs_llm", "llm_lora", "bi50_weight", "bi50_logit", "bi50_scaled", "bi50d_delta",
                "bi50d_logit", "ot_adapters", "bi75_weight")


@dataclass
class StudyConfig:
    """Every knob of the study (the CLI maps its flags onto this)."""

    llm: str
    data_dir: str
    out: str
    server_dir: str = DEFAULT_SERVER_DIR  # a folder or vendored:<set> (fedproxy_secure.data.resolve)
    server_tasks: tuple[str, ...] = ()  # empty: every task in server_dir
    limit_train: int = 200
    limit_test: int = 200
    epochs: int = 1
    lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 256
    lora_r: int = 8
    lora_alpha: float = 16.0
    keep_ratio: float = 0.5
    server_texts: int = 96
    distill_steps: int = 120
    distill_lr: float = 2e-4
    beta: float = 1.0
    threads: int = 2
    device: str = "cpu"
    seed: int = 0
    prompt_format: str = "reference"
    n_boot: int = 2000
    variants: tuple[str, ...] = ALL_VARIANTS


def server_texts(cfg: StudyConfig, n: int, seed: int, exclude: set[str]) -> list[str]:
    """Prompt + answer texts of server-only BIG-bench tasks; ConfigError naming the field if one is an
    evaluation task (``exclude``) or missing from the folder."""
    from fedproxy_secure.data.resolve import server_task_dir

    d, names = server_task_dir(sorted(exclude), list(cfg.server_tasks) or None, cfg.server_dir,
                               field="--server-dir", tasks_field="--server-tasks" if cfg.server_tasks else None)
    if not names:
        raise DataError(f"--server-dir: no task files in {d}; point it at BIG-bench tasks no client holds")
    rng = random.Random(seed)
    per = max(1, n // len(names))
    out = []
    for name in names:
        exs = list(load_task(d, name, prompt_format=cfg.prompt_format).examples)
        rng.shuffle(exs)
        out += [e.prompt + e.response for e in exs[:per]]
    rng.shuffle(out)
    return out[:n]


def adapter_block_targets(proxy_model, block_ids: list[int]) -> list[str]:
    """Full module names of the default LoRA targets inside the given proxy blocks (Offsite-Tuning adapters)."""
    from fedproxy_secure.lora import default_target_modules
    from fedproxy_secure.models import decoder_blocks

    path, _, _ = decoder_blocks(proxy_model)
    leaves = set(default_target_modules(proxy_model))
    prefixes = tuple(f"{path}.{j}." for j in block_ids)
    return sorted(name for name, _ in proxy_model.named_modules()
                  if name.startswith(prefixes) and name.rsplit(".", 1)[-1] in leaves)


@dataclass
class Study:
    """The study's shared state: LLM, data split, server text, proxies (built once, cached on disk)."""

    cfg: StudyConfig
    log: Callable[[str], None] = print
    _cache: dict = field(default_factory=dict)

    def __post_init__(self):
        from fedproxy_secure.eval.score_cache import ScoreCache
        from fedproxy_secure.models import decoder_blocks, load_causal_lm, load_tokenizer, weights_hash

        torch.set_num_threads(self.cfg.threads)
        torch.manual_seed(self.cfg.seed)
        self.out = Path(self.cfg.out)
        for sub in ("variants", "adapters"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.llm = load_causal_lm(self.cfg.llm, device=self.cfg.device).requires_grad_(False).eval()
        self.tok = load_tokenizer(self.cfg.llm)
        self.llm_hash = weights_hash(self.cfg.llm)
        tasks = list_tasks(self.cfg.data_dir)
        self.train, self.test = [], {}
        for t in tasks:
            tr, te = split_task(load_task(self.cfg.data_dir, t, prompt_format=self.cfg.prompt_format),
                                self.cfg.limit_train, self.cfg.limit_test, seed=0)
            self.train += tr
            self.test[t] = te
        self.test_list = [ex for t in tasks for ex in self.test[t]]
        allt = server_texts(self.cfg, self.cfg.server_texts * 2, self.cfg.seed, set(tasks))
        self.srv_fit, self.srv_held = allt[: len(allt) // 2], allt[len(allt) // 2:]
        self.L = len(decoder_blocks(self.llm)[1])
        self.cache = ScoreCache(self.out / "score_cache.jsonl", log=self.log)

    # building blocks (all SDK) ---------------------------------------------------------------
    def _scores(self, logits_fn, label: str) -> list[list[float]]:
        from fedproxy_secure.eval.score_cache import timed_scores

        return timed_scores(logits_fn, self.tok, self.test_list, log=self.log, label=label,
                            max_length=self.cfg.max_length, device=self.cfg.device)

    def _rows(self, method: str, scores) -> list[dict]:
        from fedproxy_secure.eval.predictions import rows_for

        return rows_for(method, self.cfg.seed, self.test_list, scores)

    def _adapter(self, name: str, base, targets: list[str] | None = None):
        """Train (or reload) a LoRA adapter on ``base`` with the client trainer; returns the PEFT model."""
        from peft import PeftModel

        from fedproxy_secure.client.trainer import train_centralized
        from fedproxy_secure.config import LoraConfig

        d = self.out / "adapters" / name
        if (d / "adapter_model.safetensors").is_file():
            return PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
        self.log(f"[{name}] training LoRA on {len(self.train)} examples")
        res = train_centralized(copy.deepcopy(base).requires_grad_(False), self.tok, self.train, epochs=self.cfg.epochs,
                                lr=self.cfg.lr, batch_size=self.cfg.batch_size, max_length=self.cfg.max_length,
                                lora_cfg=LoraConfig(r=self.cfg.lora_r, alpha=self.cfg.lora_alpha, ffa=False,
                                                    target_modules=targets), seed=self.cfg.seed,
                                device=self.cfg.device)
        res["model"].save_pretrained(d, safe_serialization=True)
        return res["model"].eval()

    def proxy(self, kind: str):
        """``(proxy module, meta)`` for ``bi50`` / ``bi75`` / ``bi50d`` (distilled) / ``ot`` via ``compress()``."""
        from fedproxy_secure.compress import compress
        from fedproxy_secure.config import CompressConfig
        from fedproxy_secure.models import set_decoder_blocks

        if kind in self._cache:
            return self._cache[kind]
        if kind not in ("bi50", "bi75", "bi50d", "ot"):
            raise ValueError(f"proxy kind {kind!r}")
        meta_path, sd = self.out / f"proxy_{kind}.json", self.out / f"proxy_{kind}.safetensors"
        if meta_path.is_file() and (kind != "bi50d" or sd.is_file()):
            meta = json.loads(meta_path.read_text())
            p = copy.deepcopy(self.llm)
            set_decoder_blocks(p, meta["layer_map"])
            if kind == "bi50d":
                from safetensors.torch import load_file

                p.load_state_dict(load_file(str(sd)), strict=False)
        else:
            cc = CompressConfig(strategy="uniform" if kind == "ot" else "bi",
                                keep_ratio=0.75 if kind == "bi75" else self.cfg.keep_ratio,
                                distill=kind == "bi50d", distill_steps=self.cfg.distill_steps if kind == "bi50d" else 0,
                                distill_lr=self.cfg.distill_lr, calib_examples=len(self.srv_fit))
            cp = compress(self.llm, self.tok, self.srv_fit, cc, heldout_texts=self.srv_held[:32], progress=False,
                          max_length=192, device=self.cfg.device)
            p, meta = cp.model, cp.meta
            if kind == "bi50d":
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in p.state_dict().items() if ".layers." in k}, str(sd))
            meta_path.write_text(json.dumps(meta, indent=1))
        p.requires_grad_(False).eval()
        self._cache[kind] = (p, meta)
        return p, meta

    # variants ------------------------------------------------------------------------------
    def run_variant(self, name: str) -> dict:
        """One variant's cached result: its prediction rows and what it measured."""
        f = self.out / "variants" / f"{name}.json"
        if f.is_file():
            return json.loads(f.read_text())
        self.log(f"=== variant {name}")
        t0 = time.time()
        res = getattr(self, "v_" + name)()
        res["name"] = name
        res["seconds"] = round(time.time() - t0, 1)
        f.write_text(json.dumps(res))
        return res

    def v_zs_llm(self):
        from fedproxy_secure.eval import model_logits_fn
        from fedproxy_secure.eval.score_cache import fingerprint

        fp = fingerprint("llm", self.llm_hash, self.cfg.max_length)
        scores = self.cache.scores(fp, self.cfg.prompt_format, model_logits_fn(self.llm), self.tok, self.test_list,
                                   max_length=self.cfg.max_length, label="zero-shot LLM", device=self.cfg.device)
        return {"rows": self._rows("zs_llm", scores), "what": "zero-shot LLM"}

    def v_llm_lora(self):
        from fedproxy_secure.eval import model_logits_fn

        pm = self._adapter("llm_lora", self.llm)
        return {"rows": self._rows("llm_lora", self._scores(model_logits_fn(pm), "llm_lora")),
                "what": "LoRA on the LLM (upper bound)"}

    def _proxy_tuned(self, kind: str, adapters_only: bool = False):
        from fedproxy_secure.eval import model_logits_fn

        p, meta = self.proxy(kind)
        targets = None
        if adapters_only:
            n = len(meta["layer_map"])
            k = meta.get("ot_adapter_blocks") or 2
            targets = adapter_block_targets(p, sorted(set(range(k)) | set(range(n - k, n))))
        name = f"{kind}_lora" + ("_adapters" if adapters_only else "")
        pm = self._adapter(name, p, targets)
        accf = self.out / f"proxy_scores_{name}.json"
        if accf.is_file():
            scores = json.loads(accf.read_text())
        else:
            scores = self._scores(model_logits_fn(pm), f"tuned proxy {name}")
            accf.write_text(json.dumps(scores))
        return p, meta, pm, scores

    def _weight_variant(self, name: str, kind: str, what: str, scale=1.0, adapters_only=False, extra=None):
        from fedproxy_secure.eval import model_logits_fn
        from fedproxy_secure.fuse.adapter import deltas_from_peft_model
        from fedproxy_secure.fuse.weight import fuse_weights

        p, meta, pm, pscores = self._proxy_tuned(kind, adapters_only)
        fused = fuse_weights(self.llm, meta, deltas_from_peft_model(pm), scale=scale)
        return {"rows": self._rows(name, self._scores(model_logits_fn(fused), name)),
                "proxy_rows": self._rows(f"proxy:{name}", pscores), "what": what,
                "layer_map": meta["layer_map"], "fusion_mode": meta["fusion_mode"], **(extra or {})}

    def v_bi50_weight(self):
        return self._weight_variant("bi50_weight", "bi50", "BI proxy (p=0.5), exact copy, weight write-back")

    def v_bi75_weight(self):
        return self._weight_variant("bi75_weight", "bi75", "BI proxy (p=0.25), weight write-back")

    def v_bi50d_delta(self):
        _, meta = self.proxy("bi50d")
        return self._weight_variant("bi50d_delta", "bi50d", "BI proxy distilled on server text (compress --distill), delta plug-in",
                                    extra={"agreement": meta.get("agreement"), "distill": meta.get("distill")})

    def v_ot_adapters(self):
        return self._weight_variant("ot_adapters", "ot", "Offsite-Tuning emulator (uniform), LoRA on first/last 2 blocks, plugged in",
                                    adapters_only=True)

    def _logit_variant(self, name: str, kind: str, what: str):
        from fedproxy_secure.fuse.logit import logit_plugin_fn

        p, meta, pm, pscores = self._proxy_tuned(kind)
        fn = logit_plugin_fn(self.llm, pm, p, beta=self.cfg.beta)
        fn.parts = [(self.llm, 1.0), (pm, self.cfg.beta), (p, -self.cfg.beta)]  # prefix-shared scoring of the same sum
        return {"rows": self._rows(name, self._scores(fn, name)), "proxy_rows": self._rows(f"proxy:{name}", pscores),
                "what": what, "beta": self.cfg.beta,
                **{k: meta[k] for k in ("agreement", "distill") if meta.get(k) is not None}}

    def v_bi50_logit(self):
        return self._logit_variant("bi50_logit", "bi50", "logit plug-in (proxy-tuning) with the BI proxy")

    def v_bi50d_logit(self):
        return self._logit_variant("bi50d_logit", "bi50d", "logit plug-in with the distilled BI proxy")

    def v_bi50_scaled(self):
        from fedproxy_secure.eval import model_logits_fn
        from fedproxy_secure.fuse.adapter import deltas_from_peft_model
        from fedproxy_secure.fuse.calibrate import calibrate_block_scales
        from fedproxy_secure.fuse.logit import logit_plugin_fn
        from fedproxy_secure.fuse.weight import fuse_weights

        p, meta, pm, pscores = self._proxy_tuned("bi50")
        deltas = deltas_from_peft_model(pm)
        target = logit_plugin_fn(self.llm, pm, p, beta=self.cfg.beta)
        cal = calibrate_block_scales(self.llm, meta, deltas, target, self.tok, self.srv_fit[:16], progress=self.log)
        fused = fuse_weights(self.llm, meta, deltas, scale=cal.scales)
        return {"rows": self._rows("bi50_scaled", self._scores(model_logits_fn(fused), "bi50_scaled")),
                "proxy_rows": self._rows("proxy:bi50_scaled", pscores),
                "what": "BI proxy, write-back with per-block scales fitted on server text (emulate logit plug-in)",
                "scales": cal.scales, "kl_at_one": cal.loss_at_one, "kl_best": cal.loss_best}

    def run(self) -> dict:
        """Run (or reload) every variant, write predictions.jsonl, return the summary."""
        from fedproxy_secure.eval.predictions import write_jsonl

        results = {v: self.run_variant(v) for v in dict.fromkeys(["zs_llm", *self.cfg.variants])}
        rows = [r for res in results.values() for r in res["rows"] + res.get("proxy_rows", [])]
        write_jsonl(rows, self.out / "predictions.jsonl")
        return summarise(self.cfg, results, rows)


def summarise(cfg: StudyConfig, results: dict, rows: list[dict]) -> dict:
    """Rows per variant: balanced-accuracy headline of the tuned proxy and the fused LLM, and transfer with its CI."""
    from fedproxy_secure.eval.predictions import summarise_predictions

    s = summarise_predictions(rows, reference="zs_llm", upper="llm_lora" if "llm_lora" in results else None,
                              n_boot=cfg.n_boot, seed=0)
    table = []
    for name, r in results.items():
        m = s["methods"][name]
        pm = s["methods"].get(f"proxy:{name}")
        table.append({"variant": name, "what": r.get("what", ""), "proxy_bal": pm["headline"] if pm else None,
                      "fused_bal": m["headline"], "fused_bal_ci": m.get("headline_ci"), "fused_acc": m["macro_accuracy"],
                      "diff_to_zs": m.get("diff_to_reference"), "diff_ci": m.get("diff_ci"),
                      "transfer": m.get("ratio") if name not in ("zs_llm", "llm_lora") else None,
                      "transfer_ci": m.get("ratio_ci") if name not in ("zs_llm", "llm_lora") else None,
                      "per_task": {t: v["balanced_accuracy"] for t, v in m["per_task"].items()},
                      "seconds": r.get("seconds"),
                      **{k: r[k] for k in ("agreement", "distill", "scales", "kl_at_one", "kl_best", "layer_map") if k in r}})
    from fedproxy_secure.pathnames import portable_path

    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    config.update({k: portable_path(config[k]) for k in ("llm", "data_dir", "out", "server_dir")})
    return {"config": config, "rows": table,
            "zero_shot_llm": s["methods"]["zs_llm"]["headline"],
            "llm_lora": s["methods"]["llm_lora"]["headline"] if "llm_lora" in s["methods"] else None,
            "n_per_task": s["n_per_task"], "fixed_label": s["fixed_label"], "metrics": s}


def write_outputs(summary: dict, out: str | Path) -> None:
    """results.json, results.md and fusion_study.png (fused headline with 95% CI, tuned proxy, transfer labels)."""
    out = Path(out)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    f = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    ci = lambda c, k=100, nd=1: "" if not c or any(v is None or v != v for v in c) else f" [{k * c[0]:.{nd}f}, {k * c[1]:.{nd}f}]"  # noqa: E731
    ch = summary["metrics"]["methods"]
    lines = ["# Fusion study", "", f"n test per task: {summary['n_per_task']}. Macro balanced accuracy (%) with paired "
             "bootstrap 95% CIs; transfer = (fused − zero-shot) / (LLM LoRA − zero-shot).", "",
             "| variant | tuned proxy | fused LLM [95% CI] | Δ zs [95% CI] | transfer [95% CI] | what |", "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['variant']} | {f(r['proxy_bal'])} | {f(r['fused_bal'])}{ci(r['fused_bal_ci'])} | "
                     + ("-" if r["variant"] == "zs_llm" or r["diff_to_zs"] is None else f"{100 * r['diff_to_zs']:+.1f}{ci(r['diff_ci'])}")
                     + f" | {'-' if r['transfer'] is None else format(r['transfer'], '.2f') + ci(r['transfer_ci'], 1, 2)} | {r['what']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    del ch
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    y = np.array([100 * r["fused_bal"] for r in rows])
    cis = [r["fused_bal_ci"] or [r["fused_bal"]] * 2 for r in rows]
    lo = np.maximum(y - 100 * np.array([c[0] for c in cis]), 0)
    hi = np.maximum(100 * np.array([c[1] for c in cis]) - y, 0)
    ax.errorbar(range(len(rows)), y, yerr=[lo, hi], fmt="o", capsize=4, label="fused LLM (95% CI)")
    ax.scatter(range(len(rows)), [100 * r["proxy_bal"] if r["proxy_bal"] is not None else np.nan for r in rows],
               color="tab:orange", marker="x", zorder=3, label="tuned proxy")
    for i, r in enumerate(rows):
        if r["transfer"] is not None:
            ax.annotate(f"{r['transfer']:.2f}", (i, y[i] + hi[i]), textcoords="offset points", xytext=(0, 4),
                        ha="center", fontsize=8)
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("macro balanced accuracy (%)  [label: transfer]")
    vals = np.concatenate([y - lo, y + hi])
    ax.set_ylim(np.nanmin(vals) - 3, np.nanmax(vals) + 4)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Fusion study ({summary['config']['limit_train']} train / {summary['config']['limit_test']} test per task)")
    fig.tight_layout()
    fig.savefig(out / "fusion_study.png", dpi=120)
    plt.close(fig)


def print_table(summary: dict) -> None:
    """The results table on the console."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Fusion study (macro balanced accuracy)")
    for c in ("variant", "tuned proxy", "fused LLM", "transfer [95% CI]", "what"):
        t.add_column(c)
    for r in summary["rows"]:
        tr = "-" if r["transfer"] is None else f"{r['transfer']:.2f} [{r['transfer_ci'][0]:.2f}, {r['transfer_ci'][1]:.2f}]"
        t.add_row(r["variant"], "-" if r["proxy_bal"] is None else f"{100 * r['proxy_bal']:.1f}",
                  f"{100 * r['fused_bal']:.1f}", tr, r["what"])
    Console().print(t)


def run_fusion_study(cfg: StudyConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) every variant in ``cfg.variants``; write results.json, results.md, predictions.jsonl, PNG."""
    summary = Study(cfg, log).run()
    write_outputs(summary, cfg.out)
    return summary
