"""``fedproxy-secure client train``: one local round without a server (update + report on disk)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fedproxy_secure.cli.app import client_app
from fedproxy_secure.cli.common import console, exit_codes

_DEFAULT_STATE = Path.home() / ".fedproxy-secure" / "state"


@client_app.command("train")
def client_train_cmd(
    bundle: Path = typer.Option(..., "--bundle", help="proxy bundle folder (signed by the operator)"),
    data: Path = typer.Option(..., "--data", help="training data: .jsonl prompt/response or a BIG-bench .json task"),
    config: Path = typer.Option(..., "--config", help="YAML with a 'client' section (lora, train, dp, a_seed, ...)"),
    out: Path = typer.Option(..., "--out", help="update file (.safetensors); the report goes next to it as .json"),
    keyset: Optional[Path] = typer.Option(None, "--keyset", help="your pinned keyset.json (required unless --unsigned-dev)"),
    state_dir: Path = typer.Option(_DEFAULT_STATE, "--state-dir", help="anti-rollback state and the DP budget file"),
    unsigned_dev: bool = typer.Option(False, "--unsigned-dev", help="DEVELOPMENT ONLY: load an unsigned model folder"),
) -> None:
    """Train one round of LoRA on the proxy (PCR, optional DP-SGD) and write the clipped update and ε."""
    import torch

    from fedproxy_secure.client.local import load_client_train_config, load_examples, run_local_round, write_update
    from fedproxy_secure.errors import ConfigError

    with exit_codes():
        cfg = load_client_train_config(config)
        examples = load_examples(data, cfg.limit)
        if keyset is None and not unsigned_dev:
            raise ConfigError("--keyset: required to verify the proxy bundle (pass --unsigned-dev only for local development)")
        if unsigned_dev:
            from fedproxy_secure.models import load_causal_lm, load_tokenizer

            console.print("[yellow]warning: --unsigned-dev: the model folder is NOT verified[/]")
            model, tok = load_causal_lm(bundle), load_tokenizer(bundle)
        else:
            from fedproxy_secure.artifacts import load_keyset, load_verified_proxy

            model, tok = load_verified_proxy(bundle, load_keyset(keyset), state_dir)
            if tok is None:
                raise ConfigError(f"--bundle: {bundle} has no tokenizer files")
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
        torch.manual_seed(0)
        delta, report = run_local_round(model, tok, examples, cfg, state_dir=state_dir)
        upd, rep = write_update(out, delta, report)
    eps = f", epsilon={report['epsilon']:.3f} (delta={report['delta']}, {report['accountant']})" if "epsilon" in report else ""
    console.print(f"round {report['round_id']}: {report['steps']} steps, loss {report['train_loss']:.4f}, "
                  f"update norm {report['pre_clip_norm']:.4g} -> {report['post_clip_norm']:.4g}{eps}")
    console.print(f"wrote {upd} and {rep}")
