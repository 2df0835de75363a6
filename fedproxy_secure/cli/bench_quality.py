"""``bench quality``: FedProxy vs Offsite-Tuning vs FedAvg vs centralized LoRA on BIG-bench tasks,
in balanced accuracy with prior-only and chance rows and paired bootstrap CIs."""

from __future__ import annotations

from pathlib import Path

import typer

from fedproxy_secure.cli.app import bench_app
from fedproxy_secure.cli.common import RESEARCH_NOTE, RESEARCH_PANEL, console, load_benchmark


def _csv(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def _ints(s: str | None, flag: str) -> list[int] | None:
    from fedproxy_secure.errors import ConfigError

    try:
        return [int(x) for x in _csv(s)] if s else None
    except ValueError:
        raise ConfigError(f"{flag}: {s!r} is not a comma-separated list of integers (e.g. 0,1,2)") from None


@bench_app.command("quality", epilog=RESEARCH_NOTE, rich_help_panel=RESEARCH_PANEL)
def bench_quality(
    llm: Path = typer.Option(..., "--llm", help="LLM folder (HF, safetensors), e.g. from `data fetch smollm2`"),
    data_dir: Path = typer.Option(None, "--data-dir", help="folder of BIG-bench-format task files (<task>.json) or vendored:bigbench / vendored:bigbench-skill; default: the vendored tasks (the 8 dev tasks without --tasks)"),
    out: Path = typer.Option(..., "--out", help="output folder (cells are cached here: re-running resumes)"),
    tasks: str = typer.Option(None, "--tasks", help="comma-separated task names (default: every task in --data-dir)"),
    clients: int = typer.Option(8, "--clients", min=2),
    rounds: int = typer.Option(3, "--rounds", min=1),
    local_steps: int = typer.Option(8, "--local-steps", min=1),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    lr: float = typer.Option(1e-3, "--lr", help="client learning rate (FFA-LoRA: only B is trained)"),
    clip: float = typer.Option(1.0, "--clip", help="L2 bound of each client's update (train.update_clip_norm)"),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="client lr over rounds: constant | cosine"),
    server_opt: str = typer.Option("avgm", "--server-opt", help="server optimizer on the aggregate: sgd | avgm (the default recipe, FedAvgM) | adam | yogi"),
    server_lr: float = typer.Option(1.0, "--server-lr", help="server learning rate (sgd at 1.0 = plain FedAvg)"),
    server_beta1: float = typer.Option(0.7, "--server-beta1", help="server momentum (avgm) / first-moment decay (adam, yogi)"),
    val_per_task: int = typer.Option(0, "--val-per-task", help="hold this many of each task's training examples out as validation; the global proxy is scored on them every round (curves/)"),
    centralized_lr: float = typer.Option(2e-4, "--centralized-lr"),
    centralized_epochs: int = typer.Option(0, "--centralized-epochs", help="0: match the federation's example budget"),
    limit_train: int = typer.Option(100, "--limit-train", help="training examples per task"),
    limit_test: int = typer.Option(200, "--limit-test", help="test examples per task (fixed split; >= 200 recommended)"),
    methods: str = typer.Option(None, "--methods", help="comma-separated subset of: zs_llm,zs_proxy,prior_only,chance,ot,fedavg,fedproxy,sa_hties,fedproxy_dp,centralized_proxy,centralized (zs_llm, prior_only and chance are always added)"),
    settings: str = typer.Option("hetero", "--settings", help="comma-separated: hetero (one task per client), iid, dir<alpha> (label skew, e.g. dir0.5)"),
    seeds: str = typer.Option("0", "--seeds", help="training seeds, e.g. 0,1,2 (the test split stays fixed)"),
    train_sizes: str = typer.Option(None, "--train-sizes", help="instead of the method table: centralized gain vs training examples per task, e.g. 50,200,800"),
    prompt_format: str = typer.Option("reference", "--prompt-format", help="reference (no choice: lines, answers with a leading space) or bigbench"),
    calib_dir: Path = typer.Option(None, "--calib-dir", help="server calibration tasks folder, every task in it, none a client task (default: the vendored set no client holds, e.g. vendored:bigbench-skill for the dev tasks)"),
    fusion: str = typer.Option("logit", "--fusion", help="plug-in of the BI-proxy methods: logit | weight"),
    distill: bool = typer.Option(False, "--distill/--no-distill", help="distil the BI proxy towards the LLM first"),
    distill_steps: int = typer.Option(0, "--distill-steps"),
    max_length: int = typer.Option(256, "--max-length", min=16),
    n_boot: int = typer.Option(2000, "--n-boot", min=100, help="bootstrap resamples"),
    score_cache: Path = typer.Option(None, "--score-cache", help="option-score cache file shared between runs (default OUT/score_cache.jsonl)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = default)"),
) -> None:
    """Run every method on the same data and client budget; write predictions.jsonl, results.json, results.md, quality.png."""
    q = load_benchmark("quality")
    import torch

    from fedproxy_secure.cli.common import exit_codes
    from fedproxy_secure.data import list_tasks
    from fedproxy_secure.data.resolve import resolve_task_dir, server_task_dir

    with exit_codes():
        if threads:
            torch.set_num_threads(threads)
        data_dir = resolve_task_dir(_csv(tasks), data_dir, field="--data-dir")
        cal, cal_tasks = server_task_dir(_csv(tasks) or list_tasks(data_dir), None, calib_dir, field="--calib-dir")
        args = q.QualityArgs(
            llm=llm, data_dir=data_dir, out=out, tasks=_csv(tasks), clients=clients, rounds=rounds,
            local_steps=local_steps, batch_size=batch_size, lr=lr, centralized_lr=centralized_lr,
            update_clip_norm=clip, lr_schedule=lr_schedule, val_per_task=val_per_task,
            server_optimizer={"name": server_opt, "lr": server_lr, "beta1": server_beta1},
            centralized_epochs=centralized_epochs or None, limit_train=limit_train, limit_test=limit_test,
            methods=_csv(methods) or q.ALL_METHODS, settings=_csv(settings) or ["hetero"],
            seeds=_ints(seeds, "--seeds") or [0], prompt_format=prompt_format, calib_dir=cal, calib_tasks=cal_tasks, fusion=fusion,
            distill=distill, distill_steps=distill_steps, max_length=max_length, n_boot=n_boot, score_cache=score_cache, device=device,
            log=lambda m: console.print(f"[dim]{m}[/]"),
        )
        sizes = _ints(train_sizes, "--train-sizes")
        if sizes:
            q.run_train_size(args, sizes)
            console.print((out / "train_size.md").read_text())
            return
        q.run_quality(args)
        console.print((out / "results.md").read_text())
