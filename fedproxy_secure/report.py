"""Human-readable tables of results dicts (rich), shared by the CLI commands."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def print_simulation_table(results: dict, console: Console) -> None:
    """Per-task accuracy of the LLM before/after fusion and of the proxy, then the round log."""
    t = Table(title=f"{results['name']}: accuracy (%)")
    t.add_column("task")
    for col in ("LLM before", "proxy before", "proxy after", "LLM after (fused)"):
        t.add_column(col, justify="right")
    keys = ("llm_before", "proxy_before", "proxy_after", "llm_after")
    for task in results["llm_before"]["per_task"]:
        t.add_row(task, *(_pct(results[k]["per_task"].get(task)) for k in keys))
    t.add_row("[bold]mean", *(f"[bold]{_pct(results[k]['mean_accuracy'])}" for k in keys))
    console.print(t)
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
