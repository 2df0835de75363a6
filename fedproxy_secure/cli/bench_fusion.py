"""``fedproxy-secure bench fusion``: centralized LoRA on a proxy, then every plug-in variant side by side."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fedproxy_secure.cli.app import bench_app
from fedproxy_secure.cli.common import RESEARCH_NOTE, RESEARCH_PANEL, load_benchmark


@bench_app.command("fusion", epilog=RESEARCH_NOTE, rich_help_panel=RESEARCH_PANEL)
def bench_fusion(
    llm: Path = typer.Option(..., "--llm", help="server LLM folder (HF, safetensors)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="BIG-bench task folder (the evaluation tasks) or vendored:<set>; default: vendored:bigbench (the 8 dev tasks)"),
    out: Path = typer.Option(..., "--out", help="results folder (resumable: finished variants are reused)"),
    server_dir: Optional[Path] = typer.Option(None, "--server-dir", help="server-only BIG-bench tasks (calibration/distillation text; never client data), a folder or vendored:<set>; default: the vendored set no evaluation task is in (vendored:bigbench-skill for the dev tasks)"),
    limit_train: int = typer.Option(200, "--limit-train", min=1),
    limit_test: int = typer.Option(200, "--limit-test", min=1, help="test examples per task (fixed split)"),
    prompt_format: str = typer.Option("reference", "--prompt-format", help="reference (no choice: lines, answers with a leading space) or bigbench"),
    seed: int = typer.Option(0, "--seed", help="training seed (LoRA init, batch order)"),
    lr: float = typer.Option(2e-4, "--lr"),
    epochs: int = typer.Option(1, "--epochs", min=1),
    distill_steps: int = typer.Option(120, "--distill-steps", min=0),
    server_tasks: Optional[str] = typer.Option(None, "--server-tasks", help="comma-separated server-only task names in --server-dir (default: every task there); never an evaluation task"),
    server_texts: int = typer.Option(96, "--server-texts", min=8, help="server texts for fitting (as many again are held out for agreement/KL)"),
    beta: float = typer.Option(1.0, "--beta", help="logit plug-in strength"),
    threads: int = typer.Option(2, "--threads", min=1),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    variant: Optional[List[str]] = typer.Option(None, "--variant", help="run only these variants (repeatable), in order"),
) -> None:
    """Tuned-proxy and fused-LLM balanced accuracy and transfer (95% CI) per plug-in variant; results.json, results.md, predictions.jsonl, PNG."""
    from fedproxy_secure.cli.common import exit_codes
    from fedproxy_secure.data import list_tasks
    from fedproxy_secure.data.resolve import resolve_task_dir, server_task_dir

    mod = load_benchmark("fusion_study")
    with exit_codes():
        data_dir = resolve_task_dir(None, data_dir or "vendored:bigbench", field="--data-dir")
        server_dir, names = server_task_dir(list_tasks(data_dir), _names(server_tasks) or None, server_dir,
                                            field="--server-dir", tasks_field="--server-tasks")
    cfg = mod.StudyConfig(llm=str(llm), data_dir=str(data_dir), out=str(out), server_dir=str(server_dir),
                          limit_train=limit_train, limit_test=limit_test, lr=lr, epochs=epochs,
                          distill_steps=distill_steps, beta=beta, threads=threads, device=device,
                          prompt_format=prompt_format, seed=seed, server_texts=server_texts,
                          server_tasks=tuple(names),
                          variants=tuple(variant) if variant else mod.ALL_VARIANTS)
    summary = mod.run_fusion_study(cfg, log=lambda m: typer.echo(m, err=True))
    mod.print_table(summary)


def _names(csv: Optional[str]) -> list[str]:
    return [t.strip() for t in (csv or "").split(",") if t.strip()]
