"""Where a federation's gain is made or lost: FedProxy's three stages measured apart.

From prediction rows alone (``predictions.jsonl``), with these method names:

* ``zs_llm``, ``zs_proxy``: the untuned LLM and the untuned proxy;
* ``centralized``: LoRA on the LLM with all the data pooled (the upper bound);
* ``centralized_proxy@proxy`` / ``centralized_proxy``: LoRA on the proxy with the data pooled, scored
  alone / plugged into the LLM (stage iii only, no federation);
* ``<m>@proxy`` / ``<m>``: federated method ``m``'s global proxy alone / plugged into the LLM.

Ratios (headlines are macro balanced accuracies):

* stage-ii efficiency of ``m`` = (m@proxy − zs_proxy) / (centralized_proxy@proxy − zs_proxy): how much of
  what centralized tuning teaches the proxy the federation teaches it;
* stage-iii transfer = (centralized_proxy − zs_llm) / (centralized − zs_llm): how much of the LLM's own
  centralized gain a centrally tuned proxy carries into the LLM through the plug-in;
* recovery of ``m`` = (m − zs_llm) / (centralized − zs_llm): the product's end-to-end promise.

Each comes with a paired, stratified bootstrap 95% CI (the same resample for every method,
:func:`~fedproxy_secure.eval.bootstrap.resampled_headlines`); a replicate whose denominator is 0 is
dropped and counted.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from fedproxy_secure.eval.bootstrap import percentile_interval, resampled_headlines
from fedproxy_secure.eval.metrics import macro_mean, task_metrics
from fedproxy_secure.eval.predictions import credit_table

PROXY_SUFFIX = "@proxy"
CENTRAL_PROXY = "centralized_proxy"


def proxy_name(method: str) -> str:
    """The prediction-row method name of ``method``'s proxy scored alone."""
    return method + PROXY_SUFFIX


def _ratio(h: Mapping[str, float], num: tuple[str, str], den: tuple[str, str]) -> float | None:
    d = h[den[0]] - h[den[1]]
    return None if abs(d) < 1e-12 else (h[num[0]] - h[num[1]]) / d


def _ratio_ci(boot: Mapping[str, np.ndarray], num: tuple[str, str], den: tuple[str, str], level: float) -> tuple[list[float], int]:
    d = boot[den[0]] - boot[den[1]]
    ok = np.abs(d) > 1e-12
    r = np.where(ok, (boot[num[0]] - boot[num[1]]) / np.where(ok, d, 1.0), np.nan)
    return percentile_interval(r, level), int((~ok).sum())


def paired_ratios(rows: Sequence[Mapping], ratios: Mapping[str, tuple[tuple[str, str], tuple[str, str]]], *,
                  n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """``{name: {"value", "ci", ...}}`` for each ``name: ((a, b), (c, d))`` = (a − b)/(c − d) of headlines,
    plus ``"headlines"`` and ``"gains"`` (a − b and c − d with their paired CIs).

    Guarantees as :func:`stage_decomposition`: recomputed from ``rows``; a ratio with a method missing
    from ``rows`` is None with ``"missing"``; paired percentile CIs, deterministic for ``seed``.
    """
    _, views, cred = credit_table(rows)
    groups = {t: v.groups() for t, v in views.items()}
    mean_credit = {m: {t: np.mean([seeds[s][t] for s in seeds], axis=0) for t in views} for m, seeds in cred.items()}
    heads = {m: macro_mean({t: task_metrics(views[t], c[t]) for t in views}) for m, c in mean_credit.items()}
    boot = resampled_headlines(mean_credit, groups, n_boot, seed)
    out: dict = {"headlines": heads, "gains": {}, "n_boot": n_boot, "bootstrap_seed": seed}
    for name, (num, den) in ratios.items():
        need = sorted({*num, *den} - set(heads))
        if need:
            out[name] = {"value": None, "ci": None, "missing": need}
            continue
        ci, undefined = _ratio_ci(boot, num, den, level)
        out[name] = {"value": _ratio(heads, num, den), "ci": ci, "undefined_replicates": undefined}
        for a, b in (num, den):
            out["gains"][f"{a} - {b}"] = {"value": heads[a] - heads[b],
                                          "ci": percentile_interval(boot[a] - boot[b], level)}
    return out


def stage_decomposition(rows: Sequence[Mapping], federated: Sequence[str], *, n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> dict:
    """Stage-ii efficiency and recovery of every method in ``federated`` and the stage-iii transfer.

    Guarantees: every value is recomputed from ``rows`` (credits averaged over seeds per example);
    a ratio whose inputs are missing from ``rows`` is reported as None with the missing method names
    under ``"missing"``; the CIs are paired percentile intervals, deterministic for a given ``seed``.
    """
    specs = {"stage_iii_transfer": ((CENTRAL_PROXY, "zs_llm"), ("centralized", "zs_llm"))}
    for m in federated:
        specs[f"{m}/stage_ii_efficiency"] = ((proxy_name(m), "zs_proxy"), (proxy_name(CENTRAL_PROXY), "zs_proxy"))
        specs[f"{m}/recovery"] = ((m, "zs_llm"), ("centralized", "zs_llm"))
    r = paired_ratios(rows, specs, n_boot=n_boot, seed=seed, level=level)
    return {"headlines": r["headlines"], "n_boot": n_boot, "bootstrap_seed": seed,
            "stage_iii_transfer": r["stage_iii_transfer"],
            "methods": {m: {"stage_ii_efficiency": r[f"{m}/stage_ii_efficiency"], "recovery": r[f"{m}/recovery"]}
                        for m in federated}}
