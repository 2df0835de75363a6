"""``bench recipe``: choose the federation recipe (stage ii) on validation data only."""

from __future__ import annotations

from pathlib import Path

import typer

from fedproxy_secure.cli.app import bench_app
from fedproxy_secure.cli.bench_quality import _csv
from fedproxy_secure.cli.common import RESEARCH_NOTE, RESEARCH_PANEL, console, load_benchmark


@bench_app.command("recipe", epilog=RESEARCH_NOTE, rich_help_panel=RESEARCH_PANEL)
def bench_recipe(
    llm: Path = typer.Option(..., "--llm", help="LLM folder (HF, safetensors), e.g. from `data fetch smollm2`"),
    grid: Path = typer.Option(..., "--grid", help="YAML file {candidates: [{name, lr, update_clip_norm, rounds, local_steps, lr_schedule, server_optimizer, method}]} (see examples/recipe-grid.yaml)"),
    out: Path = typer.Option(..., "--out", help="output folder (each candidate is cached: re-running resumes)"),
    data_dir: Path = typer.Option(None, "--data-dir", help="task folder or vendored:<set> (default: the vendored dev tasks)"),
    tasks: str = typer.Option(None, "--tasks", help="comma-separated task names (default: every task in --data-dir)"),
    setting: str = typer.Option("dir0.5", "--setting", help="hetero, iid or dir<alpha> (label skew)"),
    clients: int = typer.Option(8, "--clients", min=2),
    rounds: int = typer.Option(6, "--rounds", min=1),
    local_steps: int = typer.Option(8, "--local-steps", min=1),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    lr: float = typer.Option(1e-3, "--lr"),
    limit_train: int = typer.Option(200, "--limit-train", help="training examples per task (validation included)"),
    limit_test: int = typer.Option(200, "--limit-test", help="test examples carved out per task (never scored here)"),
    val_per_task: int = typer.Option(40, "--val-per-task", min=1, help="validation examples held out of each task's training split"),
    seed: int = typer.Option(0, "--seed"),
    smooth: int = typer.Option(2, "--smooth", min=1, help="selection = mean validation score over the last N rounds"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = default)"),
) -> None:
    """Federate every candidate recipe on the same clients; score the global proxy on validation data after
    every round; write recipe.json (curves, wall times, the choice) and recipe.png. Never scores the test split."""
    q, rc = load_benchmark("quality"), load_benchmark("recipe")
    import torch

    from fedproxy_secure.cli.common import exit_codes
    from fedproxy_secure.data import list_tasks
    from fedproxy_secure.data.resolve import resolve_task_dir, server_task_dir

    with exit_codes():
        if threads:
            torch.set_num_threads(threads)
        data_dir = resolve_task_dir(_csv(tasks), data_dir, field="--data-dir")
        cal, cal_tasks = server_task_dir(_csv(tasks) or list_tasks(data_dir), None, None, field="--calib-dir")
        base = q.QualityArgs(llm=llm, data_dir=data_dir, out=out, tasks=_csv(tasks), clients=clients, rounds=rounds,
                             local_steps=local_steps, batch_size=batch_size, lr=lr, limit_train=limit_train,
                             limit_test=limit_test, val_per_task=val_per_task, calib_dir=cal, calib_tasks=cal_tasks,
                             log=lambda m: console.print(f"[dim]{m}[/]"))
        res = rc.run_recipe_selection(base, rc.load_grid(grid), setting, seed=seed, smooth=smooth)
        for name, r in res["candidates"].items():
            console.print(f"{'*' if name == res['chosen'] else ' '} {name:32s} validation {100 * r['score']:5.1f}  "
                          f"{r['seconds']:7.0f} s")
        console.print(f"chosen: {res['chosen']} ({out / 'recipe.json'})")
