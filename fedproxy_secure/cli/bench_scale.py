"""``fedproxy-secure bench scale``: secure-aggregation cost curves as the cohort grows, HE encryption
cost, and (``--rss``) client peak memory of proxy vs LLM LoRA training on SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from fedproxy_secure.cli.app import bench_app
from fedproxy_secure.cli.common import RESEARCH_NOTE, RESEARCH_PANEL, load_benchmark


@bench_app.command("scale", epilog=RESEARCH_NOTE, rich_help_panel=RESEARCH_PANEL)
def bench_scale(
    sizes: Optional[List[int]] = typer.Option(None, "--clients", min=2,
                                              help="Cohort size n (repeatable). Default: 10, 100 and 1000."),
    values: int = typer.Option(1000, "--values", min=1, help="Vector length P of the masking curve (small: n = 1000 runs in-process)."),
    target_values: int = typer.Option(1_000_000, "--target-values", min=0,
                                      help="P of the n = 10 row checked against the 1.2x PRG-limit target (0: skip)."),
    he_values: int = typer.Option(100_000, "--he-values", min=1, help="Values per HE encryption."),
    he_threads: Optional[List[int]] = typer.Option(None, "--he-workers", "--he-threads", min=1,
                                                   help="HE worker processes, measured side by side (repeatable; "
                                                   "--he-explore uses them as TenSEAL n_threads). Default: 1 and 2."),
    he_repeats: int = typer.Option(5, "--he-repeats", min=1, help="Interleaved HE runs per worker count (medians)."),
    he_explore: bool = typer.Option(False, "--he-explore", help="Also time the HE encodings tried for the 1 µs/value target "
                                    "(ckks_vector vs batched CKKSTensor, N 4096/8192, per thread count)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Runs per point up to n = 100 (medians); larger n run once."),
    skip: Optional[List[str]] = typer.Option(None, "--skip", help="Leave out a part: masking | he (repeatable)."),
    rss: bool = typer.Option(False, "--rss", help="Add client peak RSS: proxy vs LLM LoRA training on SmolLM2, each in a "
                             "fresh process (minutes; with FEDPROXY_BENCH_LOCK=FILE each child holds that flock)."),
    llm: Optional[Path] = typer.Option(None, "--llm", help="LLM folder for --rss. Default: the SmolLM2-135M folder "
                                       "`data fetch smollm2` writes."),
    rss_batch: int = typer.Option(8, "--rss-batch", min=1, help="Batch size of both sides (--rss)."),
    rss_seq: int = typer.Option(256, "--rss-seq", min=8, help="Sequence length of both sides (--rss); prompts are cut to it."),
    rss_steps: int = typer.Option(3, "--rss-steps", min=1, help="Local steps per side (--rss)."),
    rss_threads: int = typer.Option(1, "--rss-threads", min=1, help="torch threads per side (--rss)."),
    rss_extra_batch: Optional[List[int]] = typer.Option(None, "--rss-extra-batch", min=1,
                                                        help="Repeat the pair at this batch size too (repeatable)."),
    rss_dp: bool = typer.Option(False, "--rss-dp", help="Train with DP-SGD (opacus per-sample gradients) on both sides."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
    merge: bool = typer.Option(False, "--merge", help="With --json: keep the parts this run skips from the file's previous "
                               "content (listed as parts_carried)."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Folder for one PNG per curve."),
) -> None:
    """Masking client/server time and bytes at each n with the PRG-limit ratio, HE µs and bytes per value,
    and with --rss the client peak-RSS ratio of proxy to LLM LoRA training."""
    mod = load_benchmark("scale")
    import torch

    torch.set_num_threads(1)
    bad = set(skip or ()) - {"masking", "he"}
    if bad:
        raise typer.BadParameter(f"{sorted(bad)}: use masking or he", param_hint="--skip")
    parts = [p for p in ("masking", "he") if p not in set(skip or ())] + (["rss"] if rss else [])
    if not parts:
        raise typer.BadParameter("nothing left to measure; drop a --skip or add --rss", param_hint="--skip")
    rss_kw = {"llm_dir": llm, "batch": rss_batch, "seq": rss_seq, "steps": rss_steps, "threads": rss_threads,
              "dp": rss_dp, "extra_batches": tuple(rss_extra_batch or ())}
    try:
        result = mod.run_scale_bench(sizes=sizes or (10, 100, 1000), values=values, target_values=target_values,
                                     he_values=he_values, he_threads=he_threads or (1, 2), repeats=repeats,
                                     he_repeats=he_repeats,
                                     parts=parts, he_explore=he_explore, rss=rss_kw)
    except (FileNotFoundError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if merge and json_file is not None and json_file.is_file():
        result = mod.merge_previous(result, json.loads(json_file.read_text()))
    mod.print_table(result)
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        mod.write_json(result, json_file)
        typer.echo(f"wrote {json_file}")
    if plots is not None:
        for p in mod.write_plots(result, plots):
            typer.echo(f"wrote {p}")
