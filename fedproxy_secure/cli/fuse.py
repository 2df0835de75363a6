"""``fedproxy-secure server fuse``: turn the global LoRA into a signed, servable fused model (server only)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Optional

import typer

from fedproxy_secure.cli.app import server_app

_METHODS = ("logit", "delta", "weight", "distil-lora")
_PP_HELP = "file whose first line is the key passphrase (else env FEDPROXY_KEY_PASSPHRASE; else unencrypted)"


@server_app.command("fuse")
def server_fuse(
    llm: Path = typer.Option(..., "--llm", help="the server's LLM folder (server-side only; never sent to clients)"),
    proxy: Optional[Path] = typer.Option(None, "--proxy", help="proxy folder with fedproxy.json (its layer map); or use --federation"),
    lora: Optional[Path] = typer.Option(None, "--lora", help="PEFT adapter folder of the global LoRA (adapter_config.json + adapter_model.safetensors); or use --federation"),
    federation: Optional[Path] = typer.Option(None, "--federation", help="the federation's server folder: fuse the global LoRA of --round (default: the last finished round) directly, as `server export` would write it"),
    out: Path = typer.Option(..., "--out", help="new folder for the signed fused model"),
    key: Optional[Path] = typer.Option(None, "--key", help="operator's KEYDIR/server.key (Ed25519; `server keygen` makes one): signs the folder"),
    method: str = typer.Option(
        "logit", "--method",
        help="logit (default; the best measured transfer so far): LLM + beta*(tuned proxy - base proxy) served as one "
             "module by fedproxy_secure.fuse.load_fused, the proxy kept as the LLM's blocks + layer map + LoRA; "
             "delta: dense W_llm += scale*dW from a DISTILLED proxy's LoRA; "
             "weight: dense write-back of the LoRA into the LLM's mapped blocks (any proxy); "
             "distil-lora (experimental): distil the logit plug-in into a LoRA on the LLM itself on --server-text, merged "
             "into a dense model any HF stack serves"),
    beta: float = typer.Option(1.0, "--beta", min=0.0, help="logit: z = z_llm + beta*(z_tuned - z_base) (recorded in fused.json)"),
    scale: float = typer.Option(1.0, "--scale", min=0.0, help="delta/weight: W[l_j] += scale*dW_j"),
    source_round: Optional[int] = typer.Option(None, "--round", help="federation round the adapter comes from (recorded)"),
    aggregator: Optional[str] = typer.Option(None, "--aggregator", help="aggregator that produced the adapter (recorded)"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=_PP_HELP),
    server_text: Optional[Path] = typer.Option(None, "--server-text", help="distil-lora: SERVER text (as `compress --calib`: .txt folder, .jsonl or BIG-bench .json); never client data"),
    server_text_limit: int = typer.Option(1024, "--server-text-limit", min=2, help="distil-lora: texts read from --server-text"),
    distil_steps: int = typer.Option(200, "--distil-steps", min=1, help="distil-lora: AdamW steps (batch 4)"),
    distil_lr: float = typer.Option(1e-4, "--distil-lr", help="distil-lora: learning rate"),
    distil_rank: int = typer.Option(8, "--distil-rank", min=1, help="distil-lora: LoRA rank on the LLM (alpha = 2*rank)"),
    max_length: int = typer.Option(256, "--max-length", min=8, help="distil-lora: tokens per server text"),
    device: str = typer.Option("cpu", "--device", help="where the LLM's weights go: cpu, cuda or auto (accelerate spreads them over GPU, CPU and disk)"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="with --device auto: memory per device, e.g. cpu=8GiB,0=20GiB (the rest goes to --offload-dir)"),
    offload_dir: Optional[Path] = typer.Option(None, "--offload-dir", help="with --device auto: folder for weights that fit in no device's --max-memory"),
    threads: int = typer.Option(2, "--threads", min=1, help="torch CPU threads"),
) -> None:
    """Fuse the global LoRA into the LLM and write a folder signed with the operator's key (MANIFEST.json/.sig).

    Load it with ``fedproxy_secure.fuse.load_fused_model(OUT, keyset)`` (any method) or
    ``load_fused(OUT, keyset)`` (logit); both verify the signature before loading anything.
    """
    import torch

    from fedproxy_secure.artifacts import load_private_key, read_passphrase
    from fedproxy_secure.errors import ConfigError

    if method not in _METHODS:
        raise ConfigError(f"--method: {method!r} is not one of {', '.join(_METHODS)}")
    if key is None:
        raise ConfigError("--key: the fused folder is signed; pass the operator's key (--key KEYDIR/server.key; "
                          "make one with `fedproxy-secure server keygen --out KEYDIR`)")
    if method == "distil-lora" and server_text is None:
        raise ConfigError("--server-text: --method distil-lora distils on the server's own text; pass e.g. the "
                          "calibration corpus given to `server compress --calib`")
    if federation is not None and (proxy is not None or lora is not None):
        raise ConfigError("--federation: give either --federation DIR or --proxy and --lora, not both")
    if federation is None and (proxy is None or lora is None):
        raise ConfigError("--proxy/--lora: both are needed (the `server export` output), or pass --federation SERVERDIR")
    from fedproxy_secure.models.loading import Placement, parse_max_memory, placement

    place = Placement(device, parse_max_memory(max_memory), offload_dir)  # ConfigError names the option
    sk = load_private_key(key, read_passphrase(passphrase_file))
    torch.set_num_threads(threads)
    with contextlib.ExitStack() as stack:
        if federation is not None:  # the same proxy + adapter `server export` writes, in a private temporary folder
            from fedproxy_secure.server.export import export_round

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedproxy-fuse-"))) / "export"
            source_round = export_round(federation, tmp, source_round)["round"]
            proxy, lora = tmp / "proxy", tmp / "adapter"
            typer.echo(f"federation {federation}: global LoRA of round {source_round}")
        with placement(place):
            _fuse_with(method, llm, proxy, lora, out, sk, server_text, server_text_limit, beta, distil_steps, distil_lr,
                       distil_rank, max_length, scale, source_round, aggregator)


def _fuse_with(method, llm, proxy, lora, out, sk, server_text, server_text_limit, beta, distil_steps, distil_lr,
               distil_rank, max_length, scale, source_round, aggregator) -> None:
    from fedproxy_secure.fuse.package import write_dense_folder, write_logit_folder

    if method == "distil-lora":
        from fedproxy_secure.compress.calib import calib_texts_from
        from fedproxy_secure.fuse.package import write_distil_lora_folder

        texts = calib_texts_from(server_text, limit=server_text_limit)
        rec = write_distil_lora_folder(llm, proxy, lora, out, sk, texts, beta=beta, steps=distil_steps, lr=distil_lr,
                                       rank=distil_rank, max_length=max_length, source_round=source_round,
                                       aggregator=aggregator)
        d = rec["distil"]
        typer.echo(f"distil-lora: held-out KL(plug-in || LLM) {d['heldout_kl_llm']:.4f} -> KL(plug-in || student) "
                   f"{d['heldout_kl_student']:.4f} nats/token ({d['train_texts']} train / {d['heldout_texts']} held-out "
                   f"server texts); wrote signed {out}")
    elif method == "logit":
        rec = write_logit_folder(llm, proxy, lora, out, sk, beta=beta, source_round=source_round, aggregator=aggregator)
        shared = "shares the LLM's blocks" if rec["proxy_shares_llm_blocks"] else f"stores {len(rec['proxy_own_tensors'])} own proxy tensors"
        typer.echo(f"logit plug-in (beta {beta}), proxy layer map {rec['layer_map']} ({shared}); wrote signed {out}")
    else:
        rec = write_dense_folder(llm, proxy, lora, out, sk, method=method, scale=scale, source_round=source_round,
                                 aggregator=aggregator)
        typer.echo(f"{method}: fused {rec['modules_fused']} matrices into LLM blocks {rec['layer_map']} (scale {scale}); wrote signed {out}")
        typer.echo(f"fused weights sha256 {rec['fused_weights_sha256']}")
