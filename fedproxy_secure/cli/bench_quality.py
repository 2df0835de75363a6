"""``bench quality``: FedProxy vs Offsite-Tuning vs FedAvg vs centralized LoRA on BIG-bench tasks."""

from __future__ import annotations

from pathlib import Path

import typer

from fedproxy_secure.cli.app import bench_app
from fedproxy_secure.cli.common import console, load_benchmark


def _csv(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


@bench_app.command("quality")
def bench_quality(
    llm: Path = typer.Option(..., "--llm", help="LLM folder (HF, safetensors), e.g. from `data fetch smollm2`"),
    data_dir: Path = typer.Option(..., "--data-dir", help="folder of BIG-bench-format task files (<task>.json)"),
    out: Path = typer.Option(..., "--out", help="output folder (cells are cached here: re-running resumes)"),
    tasks: str = typer.Option(None, "--tasks", help="comma-separated task names (default: every task in --data-dir)"),
    clients: int = typer.Option(8, "--clients", min=2),
    rounds: int = typer.Option(3, "--rounds", min=1),
    local_steps: int = typer.Option(8, "--local-steps", min=1),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    lr: float = typer.Option(1e-3, "--lr", help="client learning rate (FFA-LoRA: only B is trained)"),
    centralized_lr: float = typer.Option(2e-4, "--centralized-lr"),
    limit_train: int = typer.Option(100, "--limit-train", help="training examples per task"),
    limit_test: int = typer.Option(50, "--limit-test", help="test examples per task"),
    methods: str = typer.Option(None, "--methods", help="comma-separated subset of: zs_llm,zs_proxy,ot,fedavg,fedproxy,sa_hties,fedproxy_dp,centralized"),
    settings: str = typer.Option("hetero,iid", "--settings", help="hetero (one task per client) and/or iid"),
    calib_dir: Path = typer.Option(None, "--calib-dir", help="server calibration tasks folder (default: fetched BIG-bench tasks no client holds)"),
    fusion: str = typer.Option("logit", "--fusion", help="headline plug-in: logit | weight (the other is reported too)"),
    distill: bool = typer.Option(False, "--distill/--no-distill", help="distil the BI proxy towards the LLM first"),
    distill_steps: int = typer.Option(0, "--distill-steps"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = default)"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Run every method on the same data and client budget; write results.json, results.md and PNG plots."""
    import torch

    from fedproxy_secure.data.fetch import fetch_bigbench

    if threads:
        torch.set_num_threads(threads)
    q = load_benchmark("quality")
    cal = calib_dir or fetch_bigbench(q.DEFAULT_CALIB_TASKS)
    args = q.QualityArgs(
        llm=llm, data_dir=data_dir, out=out, tasks=_csv(tasks), clients=clients, rounds=rounds,
        local_steps=local_steps, batch_size=batch_size, lr=lr, centralized_lr=centralized_lr,
        limit_train=limit_train, limit_test=limit_test, methods=_csv(methods) or q.ALL_METHODS,
        settings=_csv(settings), calib_dir=cal, fusion=fusion, extra_fusions=[f for f in ("weight", "logit") if f != fusion], distill=distill, distill_steps=distill_steps,
        device=device, seed=seed, log=lambda m: console.print(f"[dim]{m}[/]"),
    )
    q.run_quality(args)
    console.print((out / "results.md").read_text())
