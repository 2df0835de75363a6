"""Fusion study: centralized LoRA on a proxy, then every plug-in variant side by side.

For each variant: proxy accuracy, fused-LLM accuracy and transfer =
(fused − zero-shot LLM) / (LLM LoRA − zero-shot LLM). Resumable: each variant's result is cached
as JSON in ``out/variants`` and each trained adapter as a PEFT safetensors folder in ``out/adapters``.
Server data (calibration, distillation, scale search) comes from BIG-bench tasks that are NOT
among the evaluation tasks; client (train) and test data are never used for it.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fedproxy_secure.data import list_tasks, load_task, split_task
from fedproxy_secure.errors import DataError
from fedproxy_secure.eval import evaluate_tasks, model_logits_fn, tokenize_pair
from fedproxy_secure.fuse.adapter import deltas_from_peft_model
from fedproxy_secure.fuse.calibrate import calibrate_block_scales, encode_texts
from fedproxy_secure.fuse.logit import logit_plugin_fn
from fedproxy_secure.fuse.weight import ProxyMapping, fuse_weights
from fedproxy_secure.models import decoder_blocks, load_causal_lm, load_tokenizer, set_decoder_blocks

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_SERVER_TASKS = ("anachronisms", "causal_judgment", "date_understanding", "disambiguation_qa",
                        "epistemic_reasoning", "implicatures", "logical_fallacy_detection", "snarks")
ALL_VARIANTS = ("zs_llm", "llm_lora", "bi50_weight", "bi50_logit", "bi50_scaled", "bi50d_delta",
                "bi50d_logit", "ot_adapters", "bi75_weight")


@dataclass
class StudyConfig:
    llm: str
    data_dir: str
    out: str
    server_dir: str = ".cache/bigbench-extra"
    server_tasks: tuple[str, ...] = DEFAULT_SERVER_TASKS
    limit_train: int = 200
    limit_test: int = 100
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
    seed: int = 0
    variants: tuple[str, ...] = ALL_VARIANTS


# ---------------------------------------------------------------- server data
def server_texts(cfg: StudyConfig, n: int, seed: int, exclude: set[str]) -> list[str]:
    """Prompt + answer texts of server-only BIG-bench tasks (never an evaluation task)."""
    d = Path(cfg.server_dir)
    names = [t for t in cfg.server_tasks if (d / f"{t}.json").is_file() and t not in exclude]
    if not names:
        raise DataError(f"--server-dir: no server-only task files in {d}; extract BIG-bench tasks that no client holds")
    rng = random.Random(seed)
    per = max(1, n // len(names))
    out = []
    for name in names:
        exs = list(load_task(d, name).examples)
        rng.shuffle(exs)
        out += [e.prompt + e.response for e in exs[:per]]
    rng.shuffle(out)
    return out[:n]


# ---------------------------------------------------------------- compression (local, study-only)
@torch.no_grad()
def block_influence(model, tok, texts: list[str], max_length: int = 192) -> list[float]:
    """ShortGPT Block Influence: 1 − mean cos(h_in, h_out) per block over valid tokens."""
    _, blocks, _ = decoder_blocks(model)
    sums = [0.0] * len(blocks)
    count = 0
    io: dict[int, tuple] = {}
    hooks = [b.register_forward_hook(lambda mod, a, kw_out, l=l: io.__setitem__(l, (a[0], kw_out[0] if isinstance(kw_out, tuple) else kw_out)))
             for l, b in enumerate(blocks)]
    try:
        for ids, m in encode_texts(tok, texts, max_length):
            model(input_ids=ids, attention_mask=m)
            valid = m.bool()
            for l in range(len(blocks)):
                h_in, h_out = io[l]
                cos = F.cosine_similarity(h_in[valid].float(), h_out[valid].float(), dim=-1)
                sums[l] += float(cos.sum())
            count += int(valid.sum())
    finally:
        for h in hooks:
            h.remove()
    return [1.0 - s / count for s in sums]


def bi_keep(bi: list[float], keep_ratio: float) -> list[int]:
    L = len(bi)
    k = L - math.floor(L * (1 - keep_ratio))
    return sorted(sorted(range(L), key=lambda l: -bi[l])[:k])


def ot_keep(L: int, keep_ratio: float, n_adapt: int = 2) -> list[int]:
    """Offsite-Tuning emulator: first/last ``n_adapt`` blocks + uniformly spaced middle blocks."""
    from fedproxy_secure.fuse.offsite import emulator_layer_map

    return emulator_layer_map(L, keep_ratio, n_adapt)


def make_proxy(llm, keep: list[int]):
    p = copy.deepcopy(llm)
    set_decoder_blocks(p, keep)
    return p.eval()


def distill(proxy, llm, tok, texts: list[str], steps: int, lr: float, seed: int, log: Callable[[str], None],
            bs: int = 4, max_length: int = 192) -> None:
    """KL(LLM || proxy) on server text; trains the proxy's blocks only (embeddings, norm, head frozen)."""
    _, blocks, _ = decoder_blocks(proxy)
    for p in proxy.parameters():
        p.requires_grad_(False)
    params = [p for p in blocks.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    proxy.train()
    t0 = time.time()
    for step in range(steps):
        batch = rng.sample(texts, min(bs, len(texts)))
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length, add_special_tokens=False)
        with torch.no_grad():
            tl = torch.log_softmax(llm(**enc).logits.float(), -1)
        pl = torch.log_softmax(proxy(**enc).logits.float(), -1)
        m = enc["attention_mask"].float()
        loss = ((tl.exp() * (tl - pl)).sum(-1) * m).sum() / m.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            log(f"distill step {step}/{steps} kl={float(loss):.3f} ({time.time() - t0:.0f}s)")
    proxy.eval()
    for p in proxy.parameters():
        p.requires_grad_(False)


@torch.no_grad()
def agreement(proxy, llm, tok, texts: list[str], max_length: int = 192) -> dict:
    """Top-1 next-token agreement and KL(LLM || proxy) per token on held-out server text."""
    agree = kl = n = 0.0
    for ids, m in encode_texts(tok, texts, max_length):
        tl = torch.log_softmax(llm(input_ids=ids, attention_mask=m).logits.float(), -1)
        pl = torch.log_softmax(proxy(input_ids=ids, attention_mask=m).logits.float(), -1)
        mb = m.bool()
        agree += float((tl.argmax(-1) == pl.argmax(-1))[mb].sum())
        kl += float(((tl.exp() * (tl - pl)).sum(-1))[mb].sum())
        n += float(mb.sum())
    return {"top1_agreement": agree / n, "kl_per_token": kl / n}


# ---------------------------------------------------------------- LoRA training (centralized)
def train_lora(model, tok, examples, cfg: StudyConfig, log: Callable[[str], None], layers: list[int] | None = None):
    """Centralized LoRA (r, α, all linear modules of the blocks, optionally only ``layers``); response-only loss."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=LLAMA_TARGETS,
                    layers_to_transform=layers, task_type="CAUSAL_LM")
    pm = get_peft_model(copy.deepcopy(model), lc)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    enc = [tokenize_pair(tok, e.prompt, e.response, cfg.max_length) for e in examples]
    pad = tok.pad_token_id or 0
    t0 = time.time()
    pm.train()
    step = 0
    for epoch in range(cfg.epochs):
        order = list(range(len(enc)))
        random.Random(f"{cfg.seed}:{epoch}").shuffle(order)
        n_steps = math.ceil(len(order) / cfg.batch_size)
        for s in range(n_steps):
            chunk = [enc[k] for k in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
            w = max(len(c[0]) for c in chunk)
            ids = torch.full((len(chunk), w), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for r, (seq, rs, _) in enumerate(chunk):
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
                labels[r, rs:len(seq)] = torch.tensor(seq[rs:])
            loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if s % 10 == 0 or s == n_steps - 1:
                log(f"lora step {s}/{n_steps} loss={float(loss):.3f} ({time.time() - t0:.0f}s)")
    pm.eval()
    return pm


# ---------------------------------------------------------------- the study
@dataclass
class Study:
    cfg: StudyConfig
    log: Callable[[str], None] = print
    _cache: dict = field(default_factory=dict)

    def __post_init__(self):
        torch.set_num_threads(self.cfg.threads)
        torch.manual_seed(self.cfg.seed)
        self.out = Path(self.cfg.out)
        (self.out / "variants").mkdir(parents=True, exist_ok=True)
        (self.out / "adapters").mkdir(parents=True, exist_ok=True)
        self.llm = load_causal_lm(self.cfg.llm)
        for p in self.llm.parameters():
            p.requires_grad_(False)
        self.tok = load_tokenizer(self.cfg.llm)
        tasks = list_tasks(self.cfg.data_dir)
        self.train, self.test = [], {}
        for t in tasks:
            tr, te = split_task(load_task(self.cfg.data_dir, t), self.cfg.limit_train, self.cfg.limit_test, seed=0)
            self.train += tr
            self.test[t] = te
        excl = set(tasks)
        allt = server_texts(self.cfg, self.cfg.server_texts * 2, self.cfg.seed, excl)
        self.srv_fit, self.srv_held = allt[: len(allt) // 2], allt[len(allt) // 2:]
        self.L = len(decoder_blocks(self.llm)[1])

    # cached building blocks --------------------------------------------------------------
    def _eval(self, fn) -> dict:
        t0 = time.time()
        r = evaluate_tasks(fn, self.tok, self.test, batch_size=16, max_length=self.cfg.max_length).to_dict()
        r["seconds"] = round(time.time() - t0, 1)
        return r

    def _adapter(self, name: str, base, layers=None):
        """Train (or reload) a LoRA adapter on ``base``; returns the PEFT model."""
        from peft import PeftModel

        d = self.out / "adapters" / name
        if (d / "adapter_model.safetensors").is_file():
            return PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
        self.log(f"[{name}] training LoRA on {len(self.train)} examples")
        pm = train_lora(base, self.tok, self.train, self.cfg, self.log, layers)
        pm.save_pretrained(d, safe_serialization=True)
        return pm

    def proxy(self, kind: str):
        if kind in self._cache:
            return self._cache[kind]
        meta_path = self.out / f"proxy_{kind}.json"
        if kind == "bi50" or kind == "bi75":
            ratio = self.cfg.keep_ratio if kind == "bi50" else 0.75
            if "bi" not in self._cache:
                self._cache["bi"] = block_influence(self.llm, self.tok, self.srv_fit)
            keep = bi_keep(self._cache["bi"], ratio)
            p = make_proxy(self.llm, keep)
            meta = {"layer_map": keep, "fusion_mode": "overwrite", "distilled": False, "bi": self._cache["bi"]}
        elif kind == "bi50d":
            base, bmeta = self.proxy("bi50")
            keep = bmeta["layer_map"]
            p = copy.deepcopy(base)
            sd = self.out / "proxy_bi50d.safetensors"
            if sd.is_file():
                from safetensors.torch import load_file
                p.load_state_dict(load_file(str(sd)), strict=False)
                meta = json.loads(meta_path.read_text())
            else:
                before = agreement(p, self.llm, self.tok, self.srv_held[:32])
                distill(p, self.llm, self.tok, self.srv_fit, self.cfg.distill_steps, self.cfg.distill_lr, self.cfg.seed, self.log)
                after = agreement(p, self.llm, self.tok, self.srv_held[:32])
                from safetensors.torch import save_file
                save_file({k: v.contiguous() for k, v in p.state_dict().items() if ".layers." in k}, str(sd))
                meta = {"layer_map": keep, "fusion_mode": "delta", "distilled": True,
                        "agreement_before": before, "agreement_after": after}
        elif kind == "ot":
            keep = ot_keep(self.L, self.cfg.keep_ratio, 2)
            p = make_proxy(self.llm, keep)
            meta = {"layer_map": keep, "fusion_mode": "overwrite", "distilled": False, "adapter_blocks": [0, 1, len(keep) - 2, len(keep) - 1]}
        else:
            raise ValueError(kind)
        for q in p.parameters():
            q.requires_grad_(False)
        meta_path.write_text(json.dumps(meta, indent=1))
        self._cache[kind] = (p, meta)
        return p, meta

    # variants ------------------------------------------------------------------------------
    def run_variant(self, name: str) -> dict:
        f = self.out / "variants" / f"{name}.json"
        if f.is_file():
            return json.loads(f.read_text())
        self.log(f"=== variant {name}")
        t0 = time.time()
        res = getattr(self, "v_" + name)()
        res["name"] = name
        res["seconds"] = round(time.time() - t0, 1)
        f.write_text(json.dumps(res, indent=1))
        return res

    def v_zs_llm(self):
        return {"fused": self._eval(model_logits_fn(self.llm)), "what": "zero-shot LLM"}

    def v_llm_lora(self):
        pm = self._adapter("llm_lora", self.llm)
        return {"fused": self._eval(model_logits_fn(pm)), "what": "LoRA on the LLM (upper bound)"}

    def _proxy_tuned(self, kind: str, layers=None):
        p, meta = self.proxy(kind)
        pm = self._adapter(f"{kind}_lora" if layers is None else f"{kind}_lora_adapters", p, layers)
        key = f"{kind}_acc" if layers is None else f"{kind}_ad_acc"
        accf = self.out / f"proxy_acc_{key}.json"
        if accf.is_file():
            acc = json.loads(accf.read_text())
        else:
            acc = self._eval(model_logits_fn(pm))
            accf.write_text(json.dumps(acc))
        return p, meta, pm, acc

    def _weight_variant(self, kind: str, what: str, scale=1.0, layers=None, extra=None):
        p, meta, pm, acc = self._proxy_tuned(kind, layers)
        deltas = deltas_from_peft_model(pm)
        fused = fuse_weights(self.llm, meta, deltas, scale=scale)
        r = {"proxy": acc, "fused": self._eval(model_logits_fn(fused)), "what": what,
             "layer_map": meta["layer_map"], "fusion_mode": meta["fusion_mode"]}
        if extra:
            r.update(extra)
        return r

    def v_bi50_weight(self):
        return self._weight_variant("bi50", "BI proxy (p=0.5), exact copy, weight write-back")

    def v_bi75_weight(self):
        return self._weight_variant("bi75", "BI proxy (p=0.25, 23 blocks), weight write-back")

    def v_bi50d_delta(self):
        _, meta = self.proxy("bi50d")
        return self._weight_variant("bi50d", "BI proxy distilled on server text, delta plug-in",
                                    extra={"agreement_before": meta.get("agreement_before"), "agreement_after": meta.get("agreement_after")})

    def v_ot_adapters(self):
        p, meta = self.proxy("ot")
        return self._weight_variant("ot", "Offsite-Tuning emulator (uniform), LoRA on first/last 2 blocks, plugged in",
                                    layers=meta["adapter_blocks"])

    def _logit_variant(self, kind: str, what: str):
        p, meta, pm, acc = self._proxy_tuned(kind)
        fn = logit_plugin_fn(self.llm, pm, p, beta=self.cfg.beta)
        return {"proxy": acc, "fused": self._eval(fn), "what": what, "beta": self.cfg.beta}

    def v_bi50_logit(self):
        return self._logit_variant("bi50", "logit plug-in (proxy-tuning) with the BI proxy")

    def v_bi50d_logit(self):
        return self._logit_variant("bi50d", "logit plug-in with the distilled BI proxy")

    def v_bi50_scaled(self):
        p, meta, pm, acc = self._proxy_tuned("bi50")
        deltas = deltas_from_peft_model(pm)
        target = logit_plugin_fn(self.llm, pm, p, beta=self.cfg.beta)
        cal = calibrate_block_scales(self.llm, meta, deltas, target, self.tok, self.srv_fit[:16], progress=self.log)
        fused = fuse_weights(self.llm, meta, deltas, scale=cal.scales)
        return {"proxy": acc, "fused": self._eval(model_logits_fn(fused)),
                "what": "BI proxy, write-back with per-block scales fitted on server text (emulate logit plug-in)",
                "scales": cal.scales, "kl_at_one": cal.loss_at_one, "kl_best": cal.loss_best}

    def run(self) -> dict:
        results = {}
        for v in self.cfg.variants:
            results[v] = self.run_variant(v)
        return summarise(self.cfg, results)


def summarise(cfg: StudyConfig, results: dict) -> dict:
    zs = results.get("zs_llm", {}).get("fused", {}).get("mean_accuracy")
    up = results.get("llm_lora", {}).get("fused", {}).get("mean_accuracy")
    rows = []
    for name, r in results.items():
        fa = r["fused"]["mean_accuracy"]
        tr = (fa - zs) / (up - zs) if zs is not None and up is not None and up != zs else None
        rows.append({"variant": name, "what": r.get("what", ""), "proxy_acc": (r.get("proxy") or {}).get("mean_accuracy"),
                     "fused_acc": fa, "transfer": tr, "per_task": r["fused"]["per_task"]})
    return {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}, "rows": rows,
            "zero_shot_llm": zs, "llm_lora": up}


def write_outputs(summary: dict, out: str | Path) -> None:
    out = Path(out)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(9, 4))
    names = [r["variant"] for r in rows]
    ax.bar(range(len(rows)), [100 * r["fused_acc"] for r in rows], color="tab:blue", label="LLM / fused LLM")
    ax.scatter(range(len(rows)), [100 * r["proxy_acc"] if r["proxy_acc"] is not None else float("nan") for r in rows],
               color="tab:orange", zorder=3, label="tuned proxy")
    for i, r in enumerate(rows):
        if r["transfer"] is not None:
            ax.text(i, 100 * r["fused_acc"] + 0.5, f"{r['transfer']:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    ax.set_ylabel("mean accuracy (%)  [label: transfer]")
    lo = min(100 * r["fused_acc"] for r in rows)
    ax.set_ylim(max(0, lo - 10), None)
    ax.legend(fontsize=8)
    ax.set_title(f"Fusion study ({summary['config']['limit_train']} train / {summary['config']['limit_test']} test per task)")
    fig.tight_layout()
    fig.savefig(out / "fusion_study.png", dpi=120)


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Fusion study (mean accuracy over tasks)")
    for c in ("variant", "proxy acc", "fused acc", "transfer", "what"):
        t.add_column(c)
    for r in summary["rows"]:
        t.add_row(r["variant"], "-" if r["proxy_acc"] is None else f"{100 * r['proxy_acc']:.1f}",
                  f"{100 * r['fused_acc']:.1f}", "-" if r["transfer"] is None else f"{r['transfer']:.2f}", r["what"])
    Console().print(t)


def run_fusion_study(cfg: StudyConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) every variant in ``cfg.variants``; write results.json and the PNG; return the summary."""
    summary = Study(cfg, log).run()
    write_outputs(summary, cfg.out)
    return summary
