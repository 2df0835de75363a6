"""``demo --preset tiny|smollm | --config F --out DIR``: the whole networked federation on loopback."""

from __future__ import annotations

from pathlib import Path

import typer

from fedproxy_secure.cli.app import app
from fedproxy_secure.cli.common import console, fail


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(..., "--out", help="empty output folder"),
    preset: str = typer.Option("tiny", "--preset", help="tiny (examples/demo-tiny.yaml) | smollm (examples/demo.yaml)"),
    config: Path = typer.Option(None, "--config", help="demo YAML (clients, model, data, compress, lora, dp, "
                                                       "federation, transport, eval); overrides --preset"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars and no stage log lines"),
) -> None:
    """Server + client processes over HTTPS/mTLS: compress, signed bundle, DP LoRA training with masking,
    fusion and evaluation; writes report.md, results.json, rounds.png, audit.jsonl, server/."""
    from fedproxy_secure.pipelines.demo import load_demo_spec, run_demo

    from fedproxy_secure.progress import capture_library_output, make_console

    spec, path = load_demo_spec(None if config else preset, config)
    capture_library_output(out / "logs" / "run.log")  # transformers/opacus warnings, HF bars: not the console
    con = make_console()
    res = run_demo(out, spec, log=(lambda *a, **k: None) if quiet else con.print, config_path=path, quiet=quiet)
    rounds = res["settings"]["rounds"]
    console.print(f"rounds done {res['rounds_done']}/{rounds} in {res['seconds']} s; LLM macro balanced accuracy "
                  f"{res['llm_before']['balanced_accuracy']:.3f} -> {res['llm_after']['balanced_accuracy']:.3f} (fused); "
                  f"server crashes {len(res['server_crashes'])}; audit log "
                  f"{'ok' if res['audit_log_ok'] else 'BROKEN'}; report {out / 'report.md'}")
    if res["rounds_done"] < rounds or not res["audit_log_ok"]:
        raise fail("demo did not complete every round")
