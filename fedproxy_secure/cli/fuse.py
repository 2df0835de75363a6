"""``fedproxy-secure server fuse``: turn the global LoRA into a signed, servable fused model (server only)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fedproxy_secure.cli.app import server_app

_METHODS = ("logit", "delta", "weight")
_PP_HELP = "file whose first line is the key passphrase (else env FEDPROXY_KEY_PASSPHRASE; else unencrypted)"


@server_app.command("fuse")
def server_fuse(
    llm: Path = typer.Option(..., "--llm", help="the server's LLM folder (server-side only; never sent to clients)"),
    proxy: Path = typer.Option(..., "--proxy", help="proxy folder with fedproxy.json (its layer map)"),
    lora: Path = typer.Option(..., "--lora", help="PEFT adapter folder of the global LoRA (adapter_config.json + adapter_model.safetensors)"),
    out: Path = typer.Option(..., "--out", help="new folder for the signed fused model"),
    key: Optional[Path] = typer.Option(None, "--key", help="operator's KEYDIR/server.key (Ed25519; `server keygen` makes one): signs the folder"),
    method: str = typer.Option(
        "logit", "--method",
        help="logit (default; the best measured transfer so far): LLM + beta*(tuned proxy - base proxy) served as one "
             "module by fedproxy_secure.fuse.load_fused, the proxy kept as the LLM's blocks + layer map + LoRA; "
             "delta: dense W_llm += scale*dW from a DISTILLED proxy's LoRA; "
             "weight: dense write-back of the LoRA into the LLM's mapped blocks (any proxy)"),
    beta: float = typer.Option(1.0, "--beta", min=0.0, help="logit: z = z_llm + beta*(z_tuned - z_base) (recorded in fused.json)"),
    scale: float = typer.Option(1.0, "--scale", min=0.0, help="delta/weight: W[l_j] += scale*dW_j"),
    source_round: Optional[int] = typer.Option(None, "--round", help="federation round the adapter comes from (recorded)"),
    aggregator: Optional[str] = typer.Option(None, "--aggregator", help="aggregator that produced the adapter (recorded)"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=_PP_HELP),
) -> None:
    """Fuse the global LoRA into the LLM and write a folder signed with the operator's key (MANIFEST.json/.sig).

    Load it with ``fedproxy_secure.fuse.load_fused_model(OUT, keyset)`` (any method) or
    ``load_fused(OUT, keyset)`` (logit); both verify the signature before loading anything.
    """
    import torch

    from fedproxy_secure.artifacts import load_private_key, read_passphrase
    from fedproxy_secure.errors import ConfigError
    from fedproxy_secure.fuse.package import write_dense_folder, write_logit_folder

    if method not in _METHODS:
        raise ConfigError(f"--method: {method!r} is not one of {', '.join(_METHODS)}")
    if key is None:
        raise ConfigError("--key: the fused folder is signed; pass the operator's key (--key KEYDIR/server.key; "
                          "make one with `fedproxy-secure server keygen --out KEYDIR`)")
    sk = load_private_key(key, read_passphrase(passphrase_file))
    torch.set_num_threads(2)
    if method == "logit":
        rec = write_logit_folder(llm, proxy, lora, out, sk, beta=beta, source_round=source_round, aggregator=aggregator)
        shared = "shares the LLM's blocks" if rec["proxy_shares_llm_blocks"] else f"stores {len(rec['proxy_own_tensors'])} own proxy tensors"
        typer.echo(f"logit plug-in (beta {beta}), proxy layer map {rec['layer_map']} ({shared}); wrote signed {out}")
    else:
        rec = write_dense_folder(llm, proxy, lora, out, sk, method=method, scale=scale, source_round=source_round,
                                 aggregator=aggregator)
        typer.echo(f"{method}: fused {rec['modules_fused']} matrices into LLM blocks {rec['layer_map']} (scale {scale}); wrote signed {out}")
        typer.echo(f"fused weights sha256 {rec['fused_weights_sha256']}")
