"""``server serve-model``: the fused LLM served to the federation's sites, OpenAI-compatible, over mTLS.

Routes (JSON; errors in OpenAI's ``{"error": {"message", "type", "param", "code"}}`` shape):

- ``GET  /v1/models``            the one served model
- ``POST /v1/completions``       greedy completion of ``prompt`` (``stream: true`` gives server-sent events)
- ``POST /v1/chat/completions``  greedy chat completion (chat template, or the plain one; ``stream`` too)

Who may call: the TLS layer demands a client certificate signed by the federation CA at the
handshake (the federation server's own TLS 1.3 context, ``transport.tls``), so a site without one
never reaches a route. Each request is then bound to the certificate's site name (its CN), which
must be an *active* enrolment of the federation's store (an unenrolled or revoked site gets 403,
checked per request so a revocation applies at once), and spends one token of that site's bucket
(429 with ``Retry-After`` when empty).

What is recorded: one ``serve_request`` entry per request in the federation's audit log with the
site, endpoint, status, prompt/completion token counts and latency; never prompt or completion text.

The model is loaded only through :func:`fedproxy_secure.fuse.load_fused_model` against the
federation's pinned keyset, so nothing unsigned is ever parsed or served.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from fedproxy_secure.errors import ConfigError
from fedproxy_secure.server.serve_policy import (
    ChatMessage, RateLimiter, ServeSettings, chat_prompt, cut_at_stop, normalise_stop, retry_after_header,
    safe_stream_prefix, site_of_certificate,
)
from fedproxy_secure.server.setup import server_paths

#: key of the peer certificate in the ASGI scope (ASGI TLS extension: ``extensions["tls"]["client_cert_chain"]``)
TLS_EXT = "tls"
AUDIT_EVENT = "serve_request"


# --------------------------------------------------------------------------- requests
class _Base(BaseModel):
    # fields OpenAI clients may send that greedy decoding has no use for (temperature, top_p, user, ...)
    # are accepted and ignored; the fields below are validated
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        normalise_stop(v)
        return v


class CompletionRequest(_Base):
    """``POST /v1/completions`` body (one prompt)."""

    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("give one prompt (a string or a list of one string)")
            return v[0]
        return v


class ChatRequest(_Base):
    """``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class HTTPError(Exception):
    """A refusal with its HTTP status, OpenAI error type and optional headers."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers or {}


# --------------------------------------------------------------------------- generation
def _cache_kw(model: Any) -> str:
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def greedy_token_ids(model: Any, prompt_ids: list[int], max_new: int, eos: int | None) -> Iterator[int]:
    """Greedy next tokens of ``prompt_ids`` one at a time (KV cache kept between steps), stopping after
    ``max_new`` tokens or after yielding ``eos``. Works for the fused logit module and dense HF models."""
    import torch

    if not prompt_ids:
        raise HTTPError(400, "the prompt is empty after tokenisation", param="prompt")
    name = _cache_kw(model)
    step = torch.tensor([prompt_ids], dtype=torch.long)
    mask = torch.ones_like(step)
    cache = None
    with torch.no_grad():
        for _ in range(max_new):
            out = model(input_ids=step, attention_mask=mask, use_cache=True, **{name: cache})
            nxt = int(out.logits[0, -1].argmax())
            cache = getattr(out, name, None)
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            yield nxt
            if eos is not None and nxt == eos:
                return
            step = torch.tensor([[nxt]], dtype=torch.long)
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)


@dataclass
class Generation:
    """The outcome of one request: final text, why it ended, token counts."""

    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


def generate(model: Any, tokenizer: Any, prompt: str, max_new: int, stops: list[str],
             on_delta: Callable[[str], None] | None = None) -> Generation:
    """Greedy completion of ``prompt``; ``on_delta`` receives the text as it becomes final.

    Guarantees: the concatenation of every ``on_delta`` piece equals the returned ``text``; the text
    ends before the earliest stop string (``finish_reason`` ``stop``), at EOS (``stop``) or after
    ``max_new`` tokens (``length``).
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    res = Generation(prompt_tokens=len(ids))
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is None and hasattr(model, "llm"):
        limit = getattr(model.llm.config, "max_position_embeddings", None)
    if limit is not None and len(ids) + max_new > int(limit):
        raise HTTPError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) exceeds the model's context of "
                             f"{int(limit)} tokens; shorten the prompt or lower max_tokens", param="max_tokens")
    eos = tokenizer.eos_token_id
    gen: list[int] = []
    sent = ""

    def emit(text: str) -> None:
        nonlocal sent
        if on_delta is not None and text.startswith(sent) and len(text) > len(sent):
            on_delta(text[len(sent):])
            sent = text

    for tok_id in greedy_token_ids(model, ids, max_new, eos):
        gen.append(tok_id)
        text, stopped = cut_at_stop(tokenizer.decode(gen, skip_special_tokens=True), stops)
        if stopped or (eos is not None and tok_id == eos):
            res.text, res.finish_reason = text, "stop"
            break
        emit(safe_stream_prefix(text, stops))
    else:
        res.text = cut_at_stop(tokenizer.decode(gen, skip_special_tokens=True), stops)[0]
    res.completion_tokens = len(gen)
    emit(res.text)
    return res


# --------------------------------------------------------------------------- audit and access
class AuditSink:
    """Appends to the federation's audit log from this process, one entry at a time.

    Each append takes an exclusive lock on ``<log>.lock`` and re-opens the log (which verifies its
    chain and picks up its current head), so entries written meanwhile by other short-lived
    commands (``server enroll``, ``revoke-site``) keep the chain intact.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, event: str, data: dict) -> None:
        """Append one entry (fsync'ed) under the file lock."""
        from fedproxy_secure.audit.log import AuditLog

        with self._lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            try:
                AuditLog(self.path).append(event, data)
            finally:
                fcntl.flock(lk, fcntl.LOCK_UN)


def site_status(db: Path, site: str) -> str | None:
    """The enrolment status of ``site`` in the store at ``db`` (``active``, ``revoked``, ...), None if unknown."""
    from fedproxy_secure.server.store import SQLiteStore

    store = SQLiteStore(db)
    try:
        return next((c["status"] for c in store.clients() if c["name"] == site), None)
    finally:
        store.close()


def peer_site(scope: dict) -> tuple[str, int]:
    """``(site, serial)`` of the client certificate of this connection; 403 when there is none."""
    import ssl

    chain = (scope.get("extensions") or {}).get(TLS_EXT, {}).get("client_cert_chain") or []
    if not chain:
        raise HTTPError(403, "no client certificate on this connection; use your site's certificate",
                        kind="permission_error")
    try:
        return site_of_certificate(ssl.PEM_cert_to_DER_cert(chain[0]))
    except ValueError as exc:
        raise HTTPError(403, f"client certificate refused: {exc}", kind="permission_error") from None


def revocation_check(server_dir: str | os.PathLike) -> Callable[[str, int], Optional[str]]:
    """``check(site, serial) -> reason | None`` over the server folder's revocation records (re-read each call).

    Refuses a certificate whose serial ``server revoke-site`` listed in ``pki/revoked.json``, any
    certificate of a revoked site, and, when ``pki/issued/SITE.json`` records the certificate
    signed at the site's CSR enrolment, any other certificate carrying that site's name.
    """
    from fedproxy_secure.server.revocation import load_revoked, revocation_paths

    issued_dir = revocation_paths(server_dir)["issued"]

    def check(site: str, serial: int) -> Optional[str]:
        revoked = load_revoked(server_dir)
        if site in revoked or any(str(serial) in v.get("serials", []) for v in revoked.values()):
            return f"site {site!r} (certificate serial {serial}) was revoked by the operator"
        rec = issued_dir / f"{site}.json"
        if rec.is_file() and str(json.loads(rec.read_text()).get("serial")) != str(serial):
            return f"certificate serial {serial} is not the one issued to site {site!r} at enrolment"
        return None

    return check


# --------------------------------------------------------------------------- the service
@dataclass
class ServeContext:
    """What the routes need: the verified model, the policy and where to audit (no globals)."""

    model: Any
    tokenizer: Any
    model_id: str
    settings: ServeSettings
    db: Path
    audit: AuditSink
    limiter: RateLimiter = None  # type: ignore[assignment]
    created: int = field(default_factory=lambda: int(time.time()))
    gen_lock: threading.Lock = field(default_factory=threading.Lock)
    access: Callable[[str, int], Optional[str]] | None = None
    #: ``--exit-after N``: called once N completions (status 200) have been served and audited
    on_completions: tuple[int, Callable[[], None]] | None = None
    completions_done: int = 0

    def __post_init__(self) -> None:
        if self.limiter is None:
            self.limiter = RateLimiter(self.settings)

    def refusal(self, site: str, serial: int) -> str | None:
        """Why ``site`` (certificate ``serial``) may not use the model now, or None when it may."""
        status = site_status(self.db, site)
        if status is None:
            return f"site {site!r} is not enrolled in this federation"
        if status != "active":
            return f"site {site!r} is {status} in this federation; ask the operator"
        return self.access(site, serial) if self.access is not None else None


def _error(exc: HTTPError) -> JSONResponse:
    return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": None}},
                        status_code=exc.status, headers=exc.headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()) + b"\n\n"


def create_serve_app(ctx: ServeContext) -> FastAPI:
    """The OpenAI-compatible FastAPI app over ``ctx`` (see the module docstring for the routes)."""
    from fedproxy_secure.server.app import parse_json

    app = FastAPI(title="fedproxy-secure fused model", docs_url=None, redoc_url=None, openapi_url=None)

    def audit(site: str | None, endpoint: str, status: int, t0: float, gen: Generation | None = None) -> None:
        ctx.audit.append(AUDIT_EVENT, {
            "site": site, "endpoint": endpoint, "status": status, "model": ctx.model_id,
            "prompt_tokens": gen.prompt_tokens if gen else 0, "completion_tokens": gen.completion_tokens if gen else 0,
            "latency_ms": round((time.monotonic() - t0) * 1000.0, 1)})
        if status == 200 and endpoint != "/v1/models" and ctx.on_completions is not None:
            ctx.completions_done += 1
            if ctx.completions_done == ctx.on_completions[0]:
                ctx.on_completions[1]()

    async def admit(request: Request) -> str:
        site, serial = peer_site(request.scope)
        why = await run_in_threadpool(ctx.refusal, site, serial)
        if why is not None:
            raise HTTPError(403, why, kind="permission_error")
        wait = ctx.limiter.try_acquire(site)
        if wait > 0:
            raise HTTPError(429, f"rate limit of site {site!r} reached; retry in {retry_after_header(wait)} s",
                            kind="rate_limit_error", headers={"Retry-After": retry_after_header(wait)})
        return site

    def site_or_none(request: Request) -> str | None:
        with contextlib.suppress(HTTPError):
            return peer_site(request.scope)[0]
        return None

    @app.get("/v1/models")
    async def models(request: Request):
        t0 = time.monotonic()
        try:
            site = await admit(request)
        except HTTPError as exc:
            await run_in_threadpool(audit, site_or_none(request), "/v1/models", exc.status, t0)
            return _error(exc)
        await run_in_threadpool(audit, site, "/v1/models", 200, t0)
        return {"object": "list", "data": [{"id": ctx.model_id, "object": "model", "created": ctx.created,
                                            "owned_by": "fedproxy-secure"}]}

    async def complete(request: Request, endpoint: str, chat: bool):
        t0 = time.monotonic()
        site = site_or_none(request)
        try:
            site = await admit(request)
            try:
                body = parse_json(await request.body())
                req = (ChatRequest if chat else CompletionRequest).model_validate(body)
            except ValidationError as exc:
                err = exc.errors()[0]
                param = ".".join(str(x) for x in err["loc"]) or None
                raise HTTPError(400, f"field {param!r}: {err['msg']}", param=param) from None
            except Exception as exc:  # noqa: BLE001 (malformed JSON: ProtocolAbort and friends)
                raise HTTPError(400, f"malformed request body: {exc}") from None
            if req.model != ctx.model_id:
                raise HTTPError(404, f"model {req.model!r} is not served here; GET /v1/models lists "
                                     f"{ctx.model_id!r}", param="model")
            max_new = req.max_tokens if req.max_tokens is not None else ctx.settings.default_max_tokens
            if max_new > ctx.settings.max_tokens_cap:
                raise HTTPError(400, f"max_tokens={max_new} exceeds this server's cap of "
                                     f"{ctx.settings.max_tokens_cap}; ask for fewer", param="max_tokens")
            prompt = chat_prompt(ctx.tokenizer, req.messages) if chat else req.prompt
            stops = normalise_stop(req.stop)
        except HTTPError as exc:
            await run_in_threadpool(audit, site, endpoint, exc.status, t0)
            return _error(exc)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if req.stream:
            return StreamingResponse(stream(rid, site, endpoint, chat, prompt, max_new, stops, t0),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        def run() -> Generation:
            with ctx.gen_lock:
                return generate(ctx.model, ctx.tokenizer, prompt, max_new, stops)

        try:
            gen = await run_in_threadpool(run)
        except HTTPError as exc:
            await run_in_threadpool(audit, site, endpoint, exc.status, t0)
            return _error(exc)
        await run_in_threadpool(audit, site, endpoint, 200, t0, gen)
        usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                 "total_tokens": gen.prompt_tokens + gen.completion_tokens}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": gen.text},
                      "finish_reason": gen.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": gen.text, "finish_reason": gen.finish_reason, "logprobs": None}
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": ctx.model_id, "choices": [choice], "usage": usage})

    async def stream(rid: str, site: str, endpoint: str, chat: bool, prompt: str, max_new: int,
                     stops: list[str], t0: float):
        """Server-sent events: one chunk per text delta, a final chunk with ``finish_reason``, ``[DONE]``.

        Generation runs to completion in a worker thread (holding the model lock) even if the
        client goes away, so the lock is always released and the request is always audited.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                d: dict = {}
                if first:
                    d["role"] = "assistant"
                if delta is not None:
                    d["content"] = delta
                c = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                c = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": obj, "created": created, "model": ctx.model_id, "choices": [c]}

        def produce() -> None:
            status, gen = 200, None
            try:
                with ctx.gen_lock:
                    gen = generate(ctx.model, ctx.tokenizer, prompt, max_new, stops,
                                   on_delta=lambda s: loop.call_soon_threadsafe(queue.put_nowait, ("delta", s)))
                loop.call_soon_threadsafe(queue.put_nowait, ("end", gen.finish_reason))
            except HTTPError as exc:
                status = exc.status
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
            except Exception as exc:  # noqa: BLE001 (report, audit, never leave the client hanging)
                status = 500
                loop.call_soon_threadsafe(queue.put_nowait, ("error", HTTPError(500, f"generation failed: "
                                                                                     f"{type(exc).__name__}", "server_error")))
            finally:
                audit(site, endpoint, status, t0, gen)

        loop.run_in_executor(None, produce)  # runs to the end on its own; it audits in its finally
        if chat:
            yield _sse(chunk(None, None, first=True))
        while True:
            kind, val = await queue.get()
            if kind == "delta":
                yield _sse(chunk(val, None))
            elif kind == "end":
                yield _sse(chunk(None, val) if chat else chunk("", val))
                break
            else:
                yield _sse({"error": {"message": val.message, "type": val.kind, "param": val.param, "code": None}})
                break
        yield _sse(b"[DONE]")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, "/v1/chat/completions", chat=True)

    return app


# --------------------------------------------------------------------------- uvicorn with the peer certificate
def _peer_protocol():
    """A uvicorn HTTP/1.1 protocol class that puts the connection's client certificate into every
    request's scope (``scope["extensions"]["tls"]["client_cert_chain"] = [PEM]``, the ASGI TLS extension)."""
    import ssl

    from uvicorn.protocols.http.h11_impl import H11Protocol

    class PeerCertH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sslobj = transport.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            tls = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
                   "tls_version": sslobj.version() if sslobj is not None else None}
            inner = self.app

            async def app(scope, receive, send):
                if scope.get("type") in ("http", "websocket"):
                    scope = dict(scope)
                    scope["extensions"] = {**(scope.get("extensions") or {}), TLS_EXT: tls}
                return await inner(scope, receive, send)

            self.app = app

    return PeerCertH11Protocol


def load_serve_context(fused: str | os.PathLike, server_dir: str | os.PathLike, settings: ServeSettings,
                       keyset: str | os.PathLike | None = None) -> ServeContext:
    """Verify and load ``fused`` against the federation's pinned keyset and build the service context.

    Guarantees: the model was loaded by :func:`fedproxy_secure.fuse.load_fused_model` (signature and
    every file hash verified before any byte was parsed); the audit log and store are the server
    folder's. ConfigError naming the option when the folder or the keyset is missing.
    """
    from fedproxy_secure.fuse import load_fused_model

    p = server_paths(server_dir)
    for k, opt in (("ca", "--dir"), ("cert", "--dir"), ("key", "--dir"), ("db", "--dir")):
        if not p[k].is_file():
            raise ConfigError(f"--dir {server_dir}: {p[k]} is missing; point --dir at the federation's server folder")
    ks = Path(keyset) if keyset is not None else p["keyset"]
    if not ks.is_file():
        raise ConfigError(f"--keyset: {ks} is missing; pass the operator's keyset.json the fused folder was signed "
                          "under (server folders made with 'server init --bundle' hold it in keys/keyset.json)")
    if not Path(fused).is_dir():
        raise ConfigError(f"--fused {fused}: not a folder; write one with 'fedproxy-secure server fuse'")
    model = load_fused_model(fused, ks)
    meta = getattr(model, "fused_meta", {}) or {}
    model_id = settings.model_id or f"fedproxy-fused-{meta.get('method', 'model')}"
    if meta.get("source_round") is not None:
        model_id = settings.model_id or f"{model_id}-r{meta['source_round']}"
    return ServeContext(model=model, tokenizer=model.tokenizer, model_id=model_id, settings=settings,
                        db=p["db"], audit=AuditSink(p["audit"]), access=revocation_check(server_dir))


def uvicorn_serve_server(ctx: ServeContext, server_dir: str | os.PathLike, host: str = "127.0.0.1",
                         port: int = 8445, log_level: str = "warning", exit_after: int | None = None):
    """A ``uvicorn.Server`` (not yet running) serving ``ctx`` with the federation's mTLS context.

    The handshake demands a client certificate of the federation CA and, when ``pki/crl.pem`` exists
    (``server revoke-site``), refuses the certificates it lists; revocations made after start are
    refused per request (:func:`revocation_check` and the store's enrolment status). With
    ``exit_after`` the server stops after that many completions were served (scripts, tests).
    """
    import uvicorn

    from fedproxy_secure.server.app import BodyLimit
    from fedproxy_secure.server.revocation import revocation_paths
    from fedproxy_secure.transport.tls import uvicorn_ssl_kwargs

    p = server_paths(server_dir)
    crl = revocation_paths(server_dir)["crl"]
    app = BodyLimit(create_serve_app(ctx), ctx.settings.max_body)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, http=_peer_protocol(),
                            timeout_keep_alive=30,
                            **uvicorn_ssl_kwargs(p["cert"], p["key"], p["ca"], crl if crl.is_file() else None))
    ctx.audit.append("serve_start", {"model": ctx.model_id, "host": host, "port": port,
                                     "method": (getattr(ctx.model, "fused_meta", {}) or {}).get("method"),
                                     "limits": ctx.settings.model_dump(mode="json", exclude={"model_id"})})
    server = uvicorn.Server(config)
    if exit_after is not None:
        ctx.on_completions = (int(exit_after), lambda: setattr(server, "should_exit", True))
    return server
