"""``fedproxy-secure server fuse``: write the global LoRA into the server's LLM (weight plug-in)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fedproxy_secure.cli.app import server_app


@server_app.command("fuse")
def server_fuse(
    llm: Path = typer.Option(..., "--llm", help="the server's LLM folder (server-side only; never sent to clients)"),
    proxy: Path = typer.Option(..., "--proxy", help="proxy folder with fedproxy.json (its layer map)"),
    lora: Path = typer.Option(..., "--lora", help="PEFT adapter folder of the global LoRA (adapter_config.json + adapter_model.safetensors)"),
    out: Path = typer.Option(..., "--out", help="new folder for the fused dense LLM (safetensors + fusion.json)"),
    scale: float = typer.Option(1.0, "--scale", min=0.0, help="λ: W[l_j] += λ·ΔW_j"),
    source_round: Optional[int] = typer.Option(None, "--round", help="federation round the adapter comes from (recorded)"),
    aggregator: Optional[str] = typer.Option(None, "--aggregator", help="aggregator that produced the adapter (recorded)"),
) -> None:
    """Merge (α/r)·B·A into each proxy block's matrices and add it to LLM block l_j; save a dense HF folder."""
    import torch

    from fedproxy_secure.fuse import fuse_folder

    torch.set_num_threads(2)
    rec = fuse_folder(llm, proxy, lora, out, scale=scale, source_round=source_round, aggregator=aggregator)
    typer.echo(f"fused {rec['modules_fused']} matrices into LLM blocks {rec['layer_map']} (scale {scale}); wrote {out}")
    typer.echo(f"fused weights sha256 {rec['fused_weights_sha256']}")
