"""``server serve-model``: serve a signed fused folder to the federation's sites (OpenAI-compatible, mTLS)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from fedproxy_secure.cli.app import client_app, server_app
from fedproxy_secure.cli.common import console, exit_codes


@server_app.command("serve-model")
def serve_model_cmd(
    fused: Path = typer.Option(..., "--fused", help="signed fused folder ('server fuse'); verified before loading"),
    dir: Path = typer.Option(Path("fedserver"), "--dir", help="the federation's server folder (CA, server TLS "
                             "certificate, enrolled sites, audit log, pinned keyset)"),
    keyset: Optional[Path] = typer.Option(None, "--keyset", help="keyset the fused folder verifies against "
                                          "[default: DIR/keys/keyset.json]"),
    config: Optional[Path] = typer.Option(None, "--config", help="serve.yaml: rate_per_minute, burst, tokens_per_day, "
                                          "max_queued_per_site, sites (per-site overrides), max_tokens_cap, "
                                          "default_max_tokens, max_body, audit_segment_bytes, model_id (see "
                                          "docs/serving.md); options below override it"),
    host: str = typer.Option("127.0.0.1", help="listen address (must be a name in the server certificate)"),
    port: int = typer.Option(8445, help="listen port (8443 is 'server start', 8444 its enrolment listener)"),
    rate_per_minute: Optional[float] = typer.Option(None, "--rate-per-minute", help="requests per minute per site "
                                                    "[default 60]"),
    burst: Optional[int] = typer.Option(None, "--burst", help="requests a site may make at once [default 10]"),
    tokens_per_day: Optional[int] = typer.Option(None, "--tokens-per-day", help="prompt + completion tokens per "
                                                 "site per UTC day [default 100000; 'tokens_per_day: null' in "
                                                 "--config: unmetered]"),
    max_queued: Optional[int] = typer.Option(None, "--max-queued", help="requests of one site waiting or decoding "
                                             "at once; more get 429 [default 4]"),
    max_tokens_cap: Optional[int] = typer.Option(None, "--max-tokens-cap", help="most new tokens per request "
                                                 "[default 256]"),
    model_id: Optional[str] = typer.Option(None, "--model-id", help="model name the API reports [default "
                                           "fedproxy-fused-<method>[-r<round>]]"),
    exit_after: Optional[int] = typer.Option(None, "--exit-after", min=1, help="stop after this many completions "
                                             "(scripted runs); default: serve until interrupted"),
) -> None:
    """Serve the fused LLM at /v1/models, /v1/completions and /v1/chat/completions (streaming too).

    TLS 1.3 with a client certificate required at the handshake; each request must come from an
    active enrolled site, spends one request of that site's bucket (429 + Retry-After when empty),
    reserves its tokens from the site's daily quota (429 when used up), waits in the site's own queue
    (sites take turns token by token) and adds one audit entry (site, endpoint, status, token counts,
    latency; never the text).
    """
    from fedproxy_secure.serving.service import load_serve_context, uvicorn_serve_server
    from fedproxy_secure.serving.settings import parse_serve_settings

    with exit_codes():
        data: dict = {}
        if config is not None:
            import yaml

            try:
                data = yaml.safe_load(config.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                from fedproxy_secure.errors import ConfigError

                raise ConfigError(f"--config {config}: cannot read it ({exc})") from None
        given = {"rate_per_minute": rate_per_minute, "burst": burst, "max_tokens_cap": max_tokens_cap,
                 "model_id": model_id, "tokens_per_day": tokens_per_day, "max_queued_per_site": max_queued}
        if isinstance(data, dict):
            data = {**data, **{k: v for k, v in given.items() if v is not None}}
        settings = parse_serve_settings(data, source=f"--config {config}" if config else "serve-model options")
        console.print(f"verifying and loading {fused} ...", highlight=False)
        ctx = load_serve_context(fused, dir, settings, keyset)
        server = uvicorn_serve_server(ctx, dir, host, port, exit_after=exit_after)
        quota = "unmetered" if settings.tokens_per_day is None else f"{settings.tokens_per_day} tokens/day"
        console.print(f"serving model {ctx.model_id!r} on https://{host}:{port}/v1 (mTLS; {settings.rate_per_minute:g} "
                      f"req/min, burst {settings.burst}, {quota}, {settings.max_queued_per_site} queued per site; "
                      f"max_tokens <= {settings.max_tokens_cap})", highlight=False, soft_wrap=True)
        server.run()


@server_app.command("verify-fused")
def verify_fused_cmd(
    fused: Path = typer.Option(..., "--fused", help="signed fused folder ('server fuse')"),
    keyset: Path = typer.Option(..., "--keyset", help="the keyset it must verify against (e.g. DIR/keys/keyset.json)"),
    copy_to: Optional[Path] = typer.Option(None, "--copy-to", help="new empty folder: write the verified bytes there "
                                           "(serve THIS copy with any stack, so nothing changes between check and load)"),
) -> None:
    """Verify a fused folder's signature and every file hash without loading it; exit 1 if invalid, 2 on usage.

    For a dense folder (--method weight|delta|distil-lora) the --copy-to folder is a plain Hugging Face
    model folder that vLLM, TGI or transformers can serve.
    """
    from fedproxy_secure.artifacts import load_keyset
    from fedproxy_secure.errors import ConfigError
    from fedproxy_secure.fuse.signed import verify_fused_folder

    with exit_codes():
        if copy_to is not None:
            if copy_to.exists() and any(copy_to.iterdir()):
                raise ConfigError(f"--copy-to {copy_to}: not empty; give a new folder")
            copy_to.mkdir(parents=True, exist_ok=True)
        vf = verify_fused_folder(fused, load_keyset(keyset), copy_to=copy_to)
    where = f"; verified copy in {copy_to}" if copy_to is not None else ""
    console.print(f"[green]ok[/] fused folder {fused}: method {vf.manifest.method}, {len(vf.manifest.files)} files, "
                  f"signed by {vf.signer.key_id[:16]}... at {vf.manifest.issued_at:%Y-%m-%d %H:%M} UTC{where}",
                  highlight=False, soft_wrap=True)


#: the most prompt bytes ``client ask`` reads (the server's chat message limit is 1 MiB)
MAX_PROMPT_BYTES = 1 << 20


def read_prompt(prompt_file: Optional[str], stdin=None) -> str:
    """The question from ``prompt_file`` (``-`` or None: standard input); never from the command line.

    ConfigError naming ``--prompt-file`` when the file is unreadable, empty or over 1 MiB."""
    import sys

    from fedproxy_secure.errors import ConfigError

    src = "standard input" if prompt_file in (None, "-") else prompt_file
    try:
        if prompt_file in (None, "-"):
            stream = stdin if stdin is not None else sys.stdin
            if stream.isatty():
                typer.echo("type the question, then Ctrl-D", err=True)
            text = stream.read(MAX_PROMPT_BYTES + 1)
        else:
            with open(prompt_file, encoding="utf-8") as fh:
                text = fh.read(MAX_PROMPT_BYTES + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--prompt-file {src}: cannot read it ({type(exc).__name__}); give a readable UTF-8 "
                          "file, or - for standard input") from None
    if len(text.encode("utf-8")) > MAX_PROMPT_BYTES:
        raise ConfigError(f"--prompt-file {src}: over {MAX_PROMPT_BYTES} bytes; shorten the question")
    text = text.rstrip("\n")
    if not text.strip():
        raise ConfigError(f"--prompt-file {src}: the question is empty; write it into the file or pipe it in")
    return text


@client_app.command("ask", context_settings={"allow_extra_args": True})
def ask_cmd(
    ctx: typer.Context,
    dir: Path = typer.Option(..., "--dir", help="the site folder: ca.pem from the kit, client.pem/client.key from "
                             "the first 'client join'"),
    url: str = typer.Option(..., "--url", help="the operator's serve-model address, e.g. https://fed.example.org:8445"),
    prompt_file: Optional[str] = typer.Option(None, "--prompt-file", help="file holding the question (sent as one "
                                              "user message); - or left out: read it from standard input"),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1),
    wait: float = typer.Option(0.0, "--wait", min=0.0, help="seconds to keep retrying while the server is not up yet"),
) -> None:
    """Ask the federation's served model one question over mTLS; print the answer (exit 1 if refused).

    The question comes from --prompt-file or standard input, never from the command line (where
    ps and the shell history would show it): echo "..." | fedproxy-secure client ask --dir ... --url ...
    """
    import httpx

    from fedproxy_secure.errors import ConfigError, FedProxyError
    from fedproxy_secure.transport.tls import client_ssl_context

    with exit_codes():
        if ctx.args:  # a question on the command line: refused without echoing it
            raise ConfigError("the question was given on the command line, where ps and the shell history show it; "
                              "put it in a file and pass --prompt-file FILE, or pipe it in (--prompt-file -)")
        for f in ("ca.pem", "client.pem", "client.key"):
            if not (dir / f).is_file():
                raise ConfigError(f"--dir {dir}: {f} is missing; run 'client join' once (it writes the site's "
                                  "certificate) or point --dir at the site folder")
        question = read_prompt(prompt_file)
        tls = client_ssl_context(dir / "ca.pem", dir / "client.pem", dir / "client.key")
        base = url.rstrip("/") + "/v1"
        deadline = time.monotonic() + wait
        with httpx.Client(verify=tls, timeout=300) as http:
            while True:
                try:
                    models = http.get(f"{base}/models")
                    break
                except httpx.ConnectError:
                    if time.monotonic() > deadline:
                        raise FedProxyError(f"--url {url}: no server answers (is 'server serve-model' running?)") \
                            from None
                    time.sleep(1.0)
            if models.status_code != 200:
                raise FedProxyError(f"refused ({models.status_code}): {_message(models)}")
            model = models.json()["data"][0]["id"]
            r = http.post(f"{base}/chat/completions", json={"model": model, "max_tokens": max_tokens,
                                                             "messages": [{"role": "user", "content": question}]})
            if r.status_code != 200:
                raise FedProxyError(f"refused ({r.status_code}): {_message(r)}")
    out = r.json()
    console.print(out["choices"][0]["message"]["content"], highlight=False, soft_wrap=True, markup=False)
    u = out["usage"]
    console.print(f"[dim]{model}: {u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens, "
                  f"finish {out['choices'][0]['finish_reason']}[/]", highlight=False)


def _message(r) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200]
