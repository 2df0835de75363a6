"""Human-readable tables (rich) and the plots shared by ``simulate`` and ``demo``.

Plots: :func:`plot_accuracy` (macro balanced accuracy per method with its paired bootstrap 95% CI as
error bars, readable names, a y-range fitted to the values) and :func:`plot_rounds` (training loss
and per-site ε per round, integer round ticks, one marker/line style per site, budget line).

matplotlib is the optional ``[plots]`` extra: without it each plot is skipped with one logged warning
and returns ``None``; the run and every other output are unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from rich.console import Console
from rich.table import Table

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")

log = logging.getLogger(__name__)


def _pyplot(path: str | Path):
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` with a logged line when the [plots] extra is missing."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: skipping %s (pip install 'fedproxy-secure[plots]')", Path(path).name)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _label(summary: dict, method: str) -> str:
    return (summary.get("labels") or {}).get(method, method)


def print_simulation_table(results: dict, console: Console) -> None:
    """Per-method macro balanced accuracy with the CI of the difference to the zero-shot LLM, then
    per-task balanced accuracy, then the round log (loss to 4 decimals, rounds from 1)."""
    ev = results.get("evaluation")
    if ev is not None:
        h = Table(title=f"{results['name']}: macro balanced accuracy (%), paired bootstrap 95% CI")
        for col in ("method", "balanced acc.", "accuracy", "Δ vs LLM", "95% CI of Δ"):
            h.add_column(col, justify="right" if col != "method" else "left")
        for m, row in ev["methods"].items():
            lo, hi = row.get("diff_ci", [None, None])
            h.add_row(_label(ev, m), _pct(row["headline"]), _pct(row["macro_accuracy"]),
                      "-" if row.get("diff_to_reference") is None else f"{100 * row['diff_to_reference']:+.1f}",
                      "-" if lo is None else f"[{100 * lo:+.1f}, {100 * hi:+.1f}]")
        console.print(h)
        t = Table(title="balanced accuracy per task (%)")
        t.add_column("task")
        methods = list(ev["methods"])
        for m in methods:
            t.add_column(_label(ev, m), justify="right")
        for task, n in ev["n_per_task"].items():
            t.add_row(f"{task} (n={n})", *(_pct(ev["methods"][m]["per_task"][task]["balanced_accuracy"]) for m in methods))
        console.print(t)
        console.print(f"LLM after (fused, loaded from the signed folder): {_pct(ev['methods']['fused']['headline'])} "
                      f"vs LLM before {_pct(ev['methods']['zs_llm']['headline'])}")
    r = Table(title=f"rounds ({results['aggregator']}, secagg {results['secagg_mode']})")
    for col in ("round", "train loss", "survivors", "mean conflict", "max |err| vs plain", "epsilon (max)", "s"):
        r.add_column(col, justify="right")
    for rec in results["rounds"]:
        ss = rec.get("secure_sum") or [{}]
        eps = [c.get("epsilon") for c in rec["clients"] if c.get("epsilon") is not None]
        err = max((s.get("max_abs_error_vs_plaintext") or 0.0) for s in ss)
        r.add_row(str(rec["round"]), f"{rec['train_loss']:.4f}" if rec["train_loss"] is not None else "-",
                  f"{ss[0].get('survivors', '-')}/{ss[0].get('cohort', '-')}",
                  "-" if rec.get("mean_conflict") is None else f"{rec['mean_conflict']:.3f}",
                  f"{err:.2e}", f"{max(eps):.2f}" if eps else "-", f"{rec['seconds']:.1f}")
    console.print(r)


def y_range(values: Sequence[float], pad: float = 0.05) -> tuple[float, float]:
    """A y-range around ``values`` (already including CI ends) that shows their differences.

    Guarantees: not anchored at 0 unless the values are; at least 0.1 wide; inside [0, 1] for
    accuracies in [0, 1]; ``pad`` of the span added on each side.
    """
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    span = max(hi - lo, 0.1)
    mid = (lo + hi) / 2
    lo, hi = mid - span / 2 - pad * span, mid + span / 2 + pad * span
    return max(0.0, lo), min(1.0, hi)


def accuracy_bars(summary: dict) -> list[dict]:
    """One bar per method: ``{"method", "label", "value", "err_low", "err_high"}`` (macro balanced accuracy,
    error bars from the headline's bootstrap 95% CI; zeros when the summary has no CI)."""
    bars = []
    for m, row in summary["methods"].items():
        v = row["headline"]
        lo, hi = row.get("headline_ci") or [v, v]
        bars.append({"method": m, "label": _label(summary, m), "value": v,
                     "err_low": max(0.0, v - lo), "err_high": max(0.0, hi - v)})
    return bars


def plot_accuracy(path: str | Path, summary: dict, *, title: str = "macro balanced accuracy",
                  extra: Mapping[str, dict] | None = None) -> Path | None:
    """Bar chart of macro balanced accuracy per method with 95% CI error bars; ``extra`` adds more
    summaries (e.g. the non-DP run), each method suffixed by its key. Writes ``path`` (PNG); ``None``
    (skipped, logged) without matplotlib."""
    plt = _pyplot(path)
    if plt is None:
        return None
    bars = accuracy_bars(summary)
    for key, s in (extra or {}).items():
        for b in accuracy_bars(s):
            if b["method"] in ("fused", "proxy_tuned"):
                bars.append({**b, "label": f"{b['label']} ({key})"})
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(bars)), 4))
    x = list(range(len(bars)))
    vals = [b["value"] for b in bars]
    ax.bar(x, vals, yerr=[[b["err_low"] for b in bars], [b["err_high"] for b in bars]], capsize=4,
           color=["#888888" if b["method"] in ("prior_only", "chance") else "#3b75af" for b in bars])
    ax.set_xticks(x, [b["label"] for b in bars], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(*y_range([b["value"] - b["err_low"] for b in bars] + [b["value"] + b["err_high"] for b in bars]))
    ax.set_ylabel("macro balanced accuracy (95% CI)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_rounds(path: str | Path, series: dict) -> Path | None:
    """Two panels: training loss per round and cumulative ε per site per round (integer round ticks,
    a distinct marker and line style per site, the ε budget as a dashed line).

    ``series``: ``{"loss": {name: [(round, value)]}, "epsilon": {site: [(round, eps)]},
    "epsilon_budget": float | None}``. Writes ``path`` (PNG); ``None`` (skipped, logged) without matplotlib.
    """
    plt = _pyplot(path)
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, pts) in enumerate(sorted((series.get("loss") or {}).items())):
        if pts:
            ax[0].plot(*zip(*pts), marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[i % len(LINESTYLES)], label=name)
    ax[0].set_xlabel("round")
    ax[0].set_ylabel("training loss")
    ax[0].set_title("training loss per round")
    if series.get("loss"):
        ax[0].legend(fontsize=7)
    eps = series.get("epsilon") or {}
    for i, (site, pts) in enumerate(sorted(eps.items())):
        if pts:
            ax[1].plot(*zip(*pts), marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[i % len(LINESTYLES)],
                       markersize=8 - i % 4, alpha=0.85, label=site)
    if series.get("epsilon_budget") is not None:
        ax[1].axhline(series["epsilon_budget"], color="red", ls="--", lw=1, label="ε budget")
    ax[1].set_xlabel("round")
    ax[1].set_ylabel("ε spent (cumulative)")
    ax[1].set_title("DP ε per site" if eps else "DP off: no ε spent")
    if eps or series.get("epsilon_budget") is not None:
        ax[1].legend(fontsize=7)
    for a in ax:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
