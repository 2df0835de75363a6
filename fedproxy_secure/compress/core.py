"""``compress``: score blocks, keep K of them in a deep copy of the LLM, optionally distil, record metadata."""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from fedproxy_secure.compress.agreement import agreement
from fedproxy_secure.compress.calib import calib_hash
from fedproxy_secure.compress.distill import distill
from fedproxy_secure.compress.influence import block_influence
from fedproxy_secure.compress.proxy_io import META_FORMAT
from fedproxy_secure.compress.selection import select_blocks, uniform_blocks
from fedproxy_secure.config import CompressConfig
from fedproxy_secure.errors import ConfigError, DataError
from fedproxy_secure.models import count_parameters, decoder_blocks, set_decoder_blocks


@dataclass
class CompressedProxy:
    """The proxy module (a new module; the LLM is untouched) and everything ``fedproxy.json`` records."""

    model: nn.Module
    meta: dict = field(default_factory=dict)


class _Progress:
    """A rich progress bar when ``enabled``; otherwise a no-op with the same interface."""

    def __init__(self, enabled: bool):
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), transient=False)

    @contextlib.contextmanager
    def running(self) -> Iterator["_Progress"]:
        if self._bar is None:
            yield self
            return
        with self._bar:
            yield self

    def task(self, description: str, total: int):
        if self._bar is None:
            return lambda n=1, **_: None
        tid = self._bar.add_task(description, total=total)
        return lambda n=1, **kw: self._bar.update(tid, advance=n, **kw)


def compress(
    llm: nn.Module, tokenizer, calib_texts: Sequence[str], cfg: CompressConfig, *,
    heldout_texts: Sequence[str] | None = None, progress: bool = True, device: str | torch.device = "cpu",
    batch_size: int = 8, max_length: int = 256,
) -> CompressedProxy:
    """Build the proxy of ``llm`` following ``cfg`` (strategy bi|uniform, keep_ratio, distillation).

    Guarantees: ``llm`` is not modified (the proxy is a deep copy); without distillation proxy block j
    is an exact copy of LLM block ``layer_map[j]`` and embeddings/norm/head equal the LLM's; with it,
    only block weights change. BI uses the first ``cfg.calib_examples`` calibration texts; distillation
    uses all of them. ``heldout_texts`` (server text disjoint from calibration) gives the agreement
    figures. Raises DataError on an empty calibration set, ModelError on an unsupported architecture.
    """
    texts = [t for t in calib_texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError("calibration: the calibration set is empty; give server text (a folder of .txt, a .jsonl or BIG-bench tasks)")
    if cfg.distill and cfg.distill_steps < 1:
        raise ConfigError("compress.distill_steps: must be >= 1 when compress.distill is on (e.g. --distill-steps 200)")
    _, blocks, _ = decoder_blocks(llm)
    n_layers = len(blocks)
    bi_texts = texts[: cfg.calib_examples]
    heldout = [t for t in (heldout_texts or []) if t.strip()]
    timings: dict[str, float] = {}
    bar = _Progress(progress)
    with bar.running():
        t0 = time.perf_counter()
        step = bar.task("block influence", total=len(bi_texts))
        scores = block_influence(llm, tokenizer, bi_texts, batch_size=batch_size, max_length=max_length,
                                 device=device, on_batch=step)
        timings["block_influence_s"] = time.perf_counter() - t0
        if cfg.strategy == "bi":
            keep = select_blocks(scores, cfg.keep_ratio)
        else:
            keep = uniform_blocks(n_layers, cfg.keep_ratio, cfg.ot_adapter_blocks)
        proxy = copy.deepcopy(llm)
        set_decoder_blocks(proxy, keep)
        agree: dict[str, dict] = {}
        if heldout:
            t0 = time.perf_counter()
            agree["before"] = agreement(proxy, llm, tokenizer, heldout, batch_size=batch_size,
                                        max_length=max_length, device=device)
            timings["agreement_s"] = time.perf_counter() - t0
        dstats = None
        if cfg.distill:
            t0 = time.perf_counter()
            step = bar.task("distillation", total=cfg.distill_steps)
            dstats = distill(proxy, llm, tokenizer, texts, cfg.distill_steps, cfg.distill_lr,
                             max_length=max_length, device=device,
                             on_step=lambda i, loss: step(1, description=f"distillation (KL {loss:.3f})"))
            timings["distill_s"] = time.perf_counter() - t0
            if heldout:
                agree["after"] = agreement(proxy, llm, tokenizer, heldout, batch_size=batch_size,
                                           max_length=max_length, device=device)
    proxy.eval()
    n = cfg.ot_adapter_blocks
    meta = {
        "format": META_FORMAT,
        "strategy": cfg.strategy,
        "keep_ratio": cfg.keep_ratio,
        "p": 1.0 - cfg.keep_ratio,
        "layer_map": list(keep),
        "bi_scores": [float(s) for s in scores],
        "ot_adapter_blocks": n if cfg.strategy == "uniform" else None,
        "ot_adapter_proxy_blocks": (list(range(n)) + list(range(len(keep) - n, len(keep)))) if cfg.strategy == "uniform" else None,
        "distilled": bool(cfg.distill),
        "distill": ({"steps": cfg.distill_steps, "lr": cfg.distill_lr, **dstats} if dstats else None),
        "fusion_mode": "delta" if cfg.distill else "overwrite",
        "agreement": agree or None,
        "calib_hash": calib_hash(texts),
        "calib_examples": len(texts),
        "calib_examples_bi": len(bi_texts),
        "heldout_examples": len(heldout),
        "base_model_hash": None,
        "n_params_llm": count_parameters(llm),
        "n_params_proxy": count_parameters(proxy),
        "n_layers_llm": n_layers,
        "n_layers_proxy": len(keep),
        "llm_architecture": type(llm).__name__,
        "timings": timings,
    }
    return CompressedProxy(model=proxy, meta=meta)
