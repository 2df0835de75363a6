"""The OpenAI-compatible routes of ``server serve-model`` over a :class:`ServeContext` (no globals).

Routes (JSON; errors in OpenAI's ``{"error": {"message", "type", "param", "code"}}`` shape):

- ``GET  /v1/models``            the one served model
- ``POST /v1/completions``       greedy completion of ``prompt`` (``stream: true`` gives server-sent events)
- ``POST /v1/chat/completions``  greedy chat completion (chat template, or the plain one; ``stream`` too)

Each request, in this order: bound to its certificate's site, which must be an active enrolment
(403); one request from the site's rate bucket (429 + ``Retry-After``); the body validated (400
naming the field); its prompt + ``max_tokens`` reserved from the site's daily token quota (429,
``insufficient_quota``); queued in the site's own queue of the fair scheduler (429 when full); decoded
one token step at a time between the sites' queues; what it did not use goes back to the quota.

What is recorded: one ``serve_request`` entry per request in the federation's audit log with the
site, endpoint, status, prompt/completion token counts and latency; never prompt or completion text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from fedproxy_secure.serving.access import peer_site, refusal
from fedproxy_secure.serving.audit_sink import SERVE_EVENT, AuditSink
from fedproxy_secure.serving.errors import HTTPError
from fedproxy_secure.serving.generation import Decoding, Generation, check_context, prompt_token_ids
from fedproxy_secure.serving.limits import QuotaExceeded, RateLimiter, Reservation, TokenQuota, retry_after_header
from fedproxy_secure.serving.prompting import chat_prompt
from fedproxy_secure.serving.requests import ChatRequest, CompletionRequest, normalise_stop
from fedproxy_secure.serving.scheduler import FairScheduler, QueueFull
from fedproxy_secure.serving.settings import ServeSettings


@dataclass
class ServeContext:
    """What the routes need: the verified model, the policy, the scheduler and where to audit."""

    model: Any
    tokenizer: Any
    model_id: str
    settings: ServeSettings
    db: Path
    audit: AuditSink
    limiter: RateLimiter = None  # type: ignore[assignment]
    quota: TokenQuota = None  # type: ignore[assignment]
    scheduler: FairScheduler = None  # type: ignore[assignment]
    created: int = field(default_factory=lambda: int(time.time()))
    #: serialises tokenizer calls (request threads encode, the decoding worker decodes)
    tok_lock: threading.Lock = field(default_factory=threading.Lock)
    access: Callable[[str, int], Optional[str]] | None = None
    #: runs what follows a decoding that no request handler waits for (settle, audit), off the decoding thread
    after: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "fedproxy-serve-after"))
    #: ``--exit-after N``: called once N completions (status 200) have been served and audited
    on_completions: tuple[int, Callable[[], None]] | None = None
    completions_done: int = 0

    def __post_init__(self) -> None:
        if self.limiter is None:
            self.limiter = RateLimiter(self.settings)
        if self.quota is None:
            self.quota = TokenQuota(self.settings)
        if self.scheduler is None:
            self.scheduler = FairScheduler(self.settings.max_queued_per_site)

    def refusal(self, site: str, serial: int) -> str | None:
        """Why ``site`` (certificate ``serial``) may not use the model now, or None when it may."""
        return refusal(self.db, site, serial, self.access)


def _error(exc: HTTPError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()) + b"\n\n"


def _http_error(exc: BaseException) -> HTTPError:
    if isinstance(exc, HTTPError):
        return exc
    return HTTPError(500, f"generation failed: {type(exc).__name__}", "server_error")


def create_serve_app(ctx: ServeContext) -> FastAPI:
    """The OpenAI-compatible FastAPI app over ``ctx`` (see the module docstring for the routes)."""
    from fedproxy_secure.server.app import parse_json

    app = FastAPI(title="fedproxy-secure fused model", docs_url=None, redoc_url=None, openapi_url=None)

    def audit(site: str | None, endpoint: str, status: int, t0: float, gen: Generation | None = None) -> None:
        ctx.audit.append(SERVE_EVENT, {
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

    def reserve(site: str, need: int) -> Reservation:
        try:
            return ctx.quota.reserve(site, need)
        except QuotaExceeded as exc:
            raise HTTPError(429, str(exc), kind="insufficient_quota", param="max_tokens",
                            headers={"Retry-After": retry_after_header(exc.wait_s)}) from None

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

    def parse(body: bytes, chat: bool) -> ChatRequest | CompletionRequest:
        try:
            return (ChatRequest if chat else CompletionRequest).model_validate(parse_json(body))
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(str(x) for x in err["loc"]) or None
            raise HTTPError(400, f"field {param!r}: {err['msg']}", param=param) from None
        except Exception as exc:  # noqa: BLE001 (malformed JSON: ProtocolAbort and friends)
            raise HTTPError(400, f"malformed request body: {exc}") from None

    async def complete(request: Request, endpoint: str, chat: bool):
        t0 = time.monotonic()
        site = site_or_none(request)
        held: Reservation | None = None
        try:
            site = await admit(request)
            req = parse(await request.body(), chat)
            if req.model != ctx.model_id:
                raise HTTPError(404, f"model {req.model!r} is not served here; GET /v1/models lists "
                                     f"{ctx.model_id!r}", param="model")
            max_new = req.max_tokens if req.max_tokens is not None else ctx.settings.default_max_tokens
            if max_new > ctx.settings.max_tokens_cap:
                raise HTTPError(400, f"max_tokens={max_new} exceeds this server's cap of "
                                     f"{ctx.settings.max_tokens_cap}; ask for fewer", param="max_tokens")
            prompt = chat_prompt(ctx.tokenizer, req.messages) if chat else req.prompt
            stops = normalise_stop(req.stop)
            ids = await run_in_threadpool(prompt_token_ids, ctx.tokenizer, prompt, ctx.tok_lock)
            if not ids:
                raise HTTPError(400, "the prompt is empty after tokenisation", param="prompt")
            check_context(ctx.model, len(ids), max_new)
            held = reserve(site, len(ids) + max_new)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            if req.stream:
                return start_stream(rid, site, endpoint, chat, ids, max_new, stops, t0, held)
            fut = ctx.scheduler.submit(site, Decoding(ctx.model, ctx.tokenizer, ids, max_new, stops,
                                                      tok_lock=ctx.tok_lock))
        except QueueFull as exc:
            ctx.quota.settle(held, 0)
            await run_in_threadpool(audit, site, endpoint, 429, t0)
            return _error(HTTPError(429, str(exc), kind="rate_limit_error", headers={"Retry-After": "1"}))
        except HTTPError as exc:
            if held is not None:
                ctx.quota.settle(held, 0)
            await run_in_threadpool(audit, site, endpoint, exc.status, t0)
            return _error(exc)
        try:
            gen = await asyncio.wrap_future(fut)
        except asyncio.CancelledError:  # the client went away: the decoding still ends, is settled and audited
            fut.add_done_callback(lambda f: ctx.after.submit(settle_and_audit, f, held, site, endpoint, t0))
            raise
        except Exception as exc:  # noqa: BLE001 (report, audit and give the tokens back)
            ctx.quota.settle(held, 0)
            err = _http_error(exc)
            await run_in_threadpool(audit, site, endpoint, err.status, t0)
            return _error(err)
        ctx.quota.settle(held, gen.prompt_tokens + gen.completion_tokens)
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

    def settle_and_audit(f, held: Reservation, site: str, endpoint: str, t0: float) -> Generation | None:
        """After a decoding no handler waits for has ended: give back its unused tokens and audit it."""
        exc = f.exception()
        gen = None if exc is not None else f.result()
        ctx.quota.settle(held, 0 if gen is None else gen.prompt_tokens + gen.completion_tokens)
        audit(site, endpoint, 200 if exc is None else _http_error(exc).status, t0, gen)
        return gen

    def start_stream(rid: str, site: str, endpoint: str, chat: bool, ids: list[int], max_new: int,
                     stops: list[str], t0: float, held: Reservation) -> StreamingResponse:
        """Queue the decoding now (QueueFull propagates to the caller) and stream its deltas.

        The request runs to its end in the scheduler even if the client goes away; it is audited and
        its unused tokens are given back when it ends (a done-callback, not the response generator).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        dec = Decoding(ctx.model, ctx.tokenizer, ids, max_new, stops, tok_lock=ctx.tok_lock,
                       on_delta=lambda s: loop.call_soon_threadsafe(queue.put_nowait, ("delta", s)))
        fut = ctx.scheduler.submit(site, dec)

        def finished(f) -> None:
            exc = f.exception()
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
                loop.call_soon_threadsafe(queue.put_nowait, ("end", f.result().finish_reason) if exc is None
                                          else ("error", _http_error(exc)))
            ctx.after.submit(settle_and_audit, f, held, site, endpoint, t0)  # the fsync off the decoding thread

        fut.add_done_callback(finished)
        return StreamingResponse(stream(rid, chat, queue), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def stream(rid: str, chat: bool, queue: asyncio.Queue):
        """Server-sent events: one chunk per text delta, a final chunk with ``finish_reason``, ``[DONE]``."""
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
                yield _sse(val.body())
                break
        yield _sse(b"[DONE]")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, "/v1/chat/completions", chat=True)

    return app
