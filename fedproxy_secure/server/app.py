"""FastAPI application of the federation server (served by uvicorn over TLS 1.3 with mTLS).

Routes (all JSON, all but ``/v1/enroll`` signed by an enrolled client, see ``transport.signing``):

- ``POST /v1/enroll``                   spend a one-time token, register the client's Ed25519 key
- ``GET  /v1/federation``               federation progress (rounds done/total, finished)
- ``GET  /v1/round``                    the current round id, stage and status
- ``GET  /v1/round/{rid}/config``       the operator-signed round config (once the cohort is fixed)
- ``GET  /v1/state/{round}``            global LoRA state after ``round`` (safetensors bytes)
- ``POST /v1/round/{rid}/{stage}``      a client's protocol message for a stage
- ``POST /v1/round/{rid}/{stage}/upload``          declare (or resume) a chunked upload of that message
- ``GET  /v1/round/{rid}/{stage}/upload``          the upload's state (which chunks are held)
- ``PUT  /v1/round/{rid}/{stage}/upload/{i}``      chunk ``i`` (raw bytes, stored durably before the reply)
- ``POST /v1/round/{rid}/{stage}/upload/commit``   join, check SHA-256, accept like a single body
- ``GET  /v1/round/{rid}/{stage}``      the server's message to this client for a stage (long poll)
- ``POST /v1/round/{rid}/report``       the minimal report: round_id, ε, δ, accountant, status (422 else)
- ``GET  /v1/bundle/{name}``            a file of the signed proxy bundle (manifest-listed only)
- ``GET  /v1/status``                   rounds as this site saw them: its own dropouts and ε only

Bodies larger than the limit are refused from ``Content-Length`` before any byte is read, and a
streamed body is cut off as soon as it passes the limit (an upload chunk's limit is the chunk
size, see ``server/uploads.py``). No route returns the server's LLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from fedproxy_secure.auditlog import AuditLog
from fedproxy_secure.errors import ProtocolAbort, SecurityError
from fedproxy_secure.server.rounds import RoundEngine
from fedproxy_secure.server.store import Storage, check_client_report
from fedproxy_secure.server.uploads import UploadLimits, parse_declaration
from fedproxy_secure.transport.signing import RequestVerifier, VerifiedRequest, b64u_decode

#: the stages of every built-in mode (routing itself accepts exactly the running mode's, RoundEngine.stage_names)
ROUTE_STAGES = ("join", "advertise", "share", "masked_input", "consistency", "unmask", "he_keys", "he_input",
                "he_decrypt",
                # SA-H-TIES (protocol/modes/sa_hties.py): the h reveal and the phase-B session's stages
                "sa_reveal", "b_advertise", "b_share", "b_masked_input", "b_consistency", "b_unmask")
MAX_JSON_DEPTH = 32


class BodyLimit:
    """ASGI middleware: 413 when Content-Length or the streamed body exceeds the path's limit.

    The limit is ``small_paths[path]`` for an exact path, else that of the first matching regex of
    ``path_limits``, else ``max_bytes``.
    """

    def __init__(self, app, max_bytes: int, small_paths: dict[str, int] | None = None,
                 path_limits: list[tuple[re.Pattern, int]] | None = None) -> None:
        self.app, self.max_bytes, self.small = app, max_bytes, small_paths or {}
        self.patterns = path_limits or []

    def limit_for(self, path: str) -> int:
        """The body limit of ``path``."""
        if path in self.small:
            return self.small[path]
        return next((n for rx, n in self.patterns if rx.match(path)), self.max_bytes)

    async def _reply(self, send, status: int, msg: str) -> None:
        body = json.dumps({"error": msg}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope.get("path", ""))
        headers = dict(scope.get("headers") or [])
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                return await self._reply(send, 400, "bad Content-Length")
            if n > limit:
                return await self._reply(send, 413, f"body of {n} bytes exceeds the {limit}-byte limit")
        if cl is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            # streamed (chunked) body: buffer at most ``limit`` bytes here, refuse beyond that
            chunks, seen = [], 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                seen += len(msg.get("body", b""))
                if seen > limit:
                    return await self._reply(send, 413, f"streamed body exceeds the {limit}-byte limit")
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body", False):
                    break
            body = b"".join(chunks)
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


def _err(status: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


def parse_json(body: bytes) -> object:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, bounded nesting; ``ProtocolAbort`` else."""
    def no_const(x):
        raise ValueError(f"{x} is not allowed")

    def no_dupes(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise ValueError(f"duplicate key {k!r}")
            d[k] = v
        return d

    try:
        text = body.decode("utf-8")
        depth = max_depth = 0
        for ch in text:
            if ch in "[{":
                depth += 1
                max_depth = max(max_depth, depth)
                if max_depth > MAX_JSON_DEPTH:
                    raise ValueError("nesting too deep")
            elif ch in "]}":
                depth -= 1
        return json.loads(text, parse_constant=no_const, object_pairs_hook=no_dupes)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolAbort(f"malformed JSON body: {exc}") from None


@dataclass
class ServerContext:
    """Everything the routes need (no globals)."""

    store: Storage
    engine: RoundEngine
    audit: AuditLog
    verifier: RequestVerifier
    bundle_dir: Path | None = None
    max_body: int = 64 << 20
    uploads: UploadLimits = UploadLimits()
    poll_s: float = 10.0
    tick_s: float = 0.2


def create_app(ctx: ServerContext) -> FastAPI:
    """The federation API over ``ctx``; starts a background ticker enforcing stage deadlines."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await run_in_threadpool(ctx.engine.recover)

        async def ticker():
            while True:
                await asyncio.sleep(ctx.tick_s)
                try:
                    await run_in_threadpool(ctx.engine.tick)
                except Exception as exc:  # never let the clock die; audit and continue
                    ctx.audit.append("error", {"where": "tick", "error": repr(exc)[:300]})

        task = asyncio.create_task(ticker())
        yield
        task.cancel()

    app = FastAPI(title="fedproxy-secure federation", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)

    def reject(status: int, reason: str, request: Request, client: str | None = None) -> JSONResponse:
        ctx.audit.append("reject", {"method": request.method, "path": request.url.path, "status": status,
                                    "reason": reason[:300], "client": client})
        return _err(status, reason)

    async def authed(request: Request) -> tuple[VerifiedRequest | None, bytes, JSONResponse | None]:
        body = await request.body()
        path = request.url.path + (("?" + request.url.query) if request.url.query else "")
        try:
            v = await run_in_threadpool(ctx.verifier.verify, request.method, path, body, request.headers)
        except SecurityError as exc:
            return None, body, reject(401, str(exc), request)
        return v, body, None

    def check_round(v: VerifiedRequest, rid: int, request: Request) -> JSONResponse | None:
        if v.round_id != str(rid):
            return reject(409, f"wrong round id: signed for {v.round_id}, path says {rid}", request, v.client_id)
        if ctx.store.get_round(rid) is None:
            cur = ctx.engine.current()
            return reject(409, f"wrong round id {rid}: current round is {cur.round_id if cur else None}",
                          request, v.client_id)
        return None

    @app.post("/v1/enroll")
    async def enroll(request: Request):
        body = await request.body()
        try:
            msg = parse_json(body)
            if not isinstance(msg, dict) or set(msg) != {"token", "pubkey"}:
                raise ProtocolAbort("enroll body must be {token, pubkey}")
            pub = b64u_decode(str(msg["pubkey"]))
        except (ProtocolAbort, ValueError) as exc:
            return reject(400, str(exc), request)
        # proof of possession: the request is signed by the key being enrolled
        pop = RequestVerifier(lambda _cid: pub, ctx.store, ctx.verifier.skew_s, ctx.verifier._clock)
        try:
            await run_in_threadpool(pop.verify, request.method, request.url.path, body, request.headers)
            cid, name = await run_in_threadpool(ctx.store.enroll, str(msg["token"]), pub)
        except SecurityError as exc:
            return reject(403, str(exc), request)
        ctx.audit.append("enrol", {"client": cid, "name": name,
                                   "pubkey_sha256": hashlib.sha256(pub).hexdigest()})
        return {"client_id": cid, "name": name}

    @app.get("/v1/federation")
    async def federation(request: Request):
        v, _, bad = await authed(request)
        if bad:
            return bad
        cur = ctx.engine.current()
        return {"rounds_total": ctx.engine.s.rounds, "rounds_done": ctx.engine.completed_rounds(),
                "finished": ctx.engine.finished(),
                "round": cur.round_id if cur else None, "stage": cur.stage if cur else None,
                "status": cur.status if cur else None}

    @app.get("/v1/round")
    async def round_now(request: Request):
        return await federation(request)

    @app.get("/v1/state/{rnd}")
    async def state(rnd: int, request: Request):
        v, _, bad = await authed(request)
        if bad:
            return bad
        gs = ctx.store.global_state(rnd)
        if gs is None:
            return _err(404, f"no global state for round {rnd}")
        return Response(gs[1], media_type="application/octet-stream")

    @app.get("/v1/status")
    async def status(request: Request):
        v, _, bad = await authed(request)
        if bad:
            return bad
        return site_status(ctx.store, v.client_id)  # a site sees only its own rows, never other sites

    @app.get("/v1/bundle/{name:path}")
    async def bundle(name: str, request: Request):
        v, _, bad = await authed(request)
        if bad:
            return bad
        if ctx.bundle_dir is None:
            return _err(404, "this server publishes no proxy bundle")
        allowed = {"MANIFEST.json", "MANIFEST.sig"}
        try:
            man = json.loads((ctx.bundle_dir / "MANIFEST.json").read_bytes())
            allowed |= {f["path"] for f in man.get("files", [])}
        except (OSError, ValueError):
            return _err(500, "bundle manifest unreadable")
        if name not in allowed:
            return reject(404, f"{name!r} is not a file of the proxy bundle", request, v.client_id)
        p = (ctx.bundle_dir / name)
        if p.is_symlink() or not p.resolve().is_relative_to(ctx.bundle_dir.resolve()):
            return reject(404, "refusing a path outside the bundle", request, v.client_id)
        return FileResponse(p, media_type="application/octet-stream")  # streamed in chunks, not read whole

    @app.get("/v1/round/{rid}/{stage}")
    async def fetch(rid: int, stage: str, request: Request):
        v, _, bad = await authed(request)
        if bad:
            return bad
        if stage not in ctx.engine.stage_names() + ("config", "result"):
            return reject(404, f"unknown stage {stage!r}", request, v.client_id)
        if v.round_id != str(rid):
            return reject(409, f"wrong round id: signed for {v.round_id}, path says {rid}", request, v.client_id)
        end = time.monotonic() + ctx.poll_s
        while True:
            st, msg = await run_in_threadpool(ctx.engine.fetch, v.client_id, rid, stage)
            if st == "ready":
                return msg
            if st == "gone":
                return _err(410, msg["reason"])
            if time.monotonic() >= end:
                return JSONResponse({"wait": True}, status_code=202)
            await asyncio.sleep(0.1)

    @app.post("/v1/round/{rid}/report")
    async def report(rid: int, request: Request):
        v, body, bad = await authed(request)
        if bad:
            return bad
        if v.round_id != str(rid):
            return reject(409, "wrong round id", request, v.client_id)
        msg = None
        try:
            msg = parse_json(body)
            if not isinstance(msg, dict) or len(body) > 4096:
                raise ProtocolAbort("report must be a small JSON object")
            check_client_report(msg, rid)  # only the minimal report keys; 422 names the refused field
        except ProtocolAbort as exc:
            return reject(422 if isinstance(msg, dict) and len(body) <= 4096 else 400, str(exc), request,
                          v.client_id)
        await run_in_threadpool(ctx.store.put_client_report, rid, v.client_id, msg)
        ctx.audit.append("client_report", {"round": rid, "client": v.client_id, "report": msg})
        return {"ok": True}

    async def stage_request(rid: int, stage: str, request: Request, ctype: str | None = "application/json"):
        """Verify a request about a client's ``stage`` message: signature, stage, round, content type."""
        v, body, bad = await authed(request)
        if bad:
            return None, body, bad
        if stage not in ctx.engine.stage_names():
            return v, body, reject(404, f"unknown stage {stage!r}", request, v.client_id)
        if (bad := check_round(v, rid, request)) is not None:
            return v, body, bad
        if ctype and request.headers.get("content-type", "").split(";")[0].strip() != ctype:
            return v, body, reject(415, f"only {ctype} bodies are accepted here", request, v.client_id)
        return v, body, None

    def refusal(exc: Exception, request: Request, client: str) -> JSONResponse:
        if isinstance(exc, LookupError):
            return reject(409, str(exc), request, client)
        if isinstance(exc, PermissionError):
            return reject(403, str(exc), request, client)
        if isinstance(exc, (ProtocolAbort, SecurityError)):
            return reject(400, str(exc), request, client)
        raise exc

    async def accept(v: VerifiedRequest, rid: int, stage: str, body: bytes, request: Request):
        """The one acceptance path of a stage message (single body or committed upload)."""
        try:
            msg = parse_json(body)
            if not isinstance(msg, dict):
                raise ProtocolAbort("body must be a JSON object")
            return await run_in_threadpool(ctx.engine.submit, v.client_id, rid, stage, msg,
                                           hashlib.sha256(body).hexdigest())
        except (LookupError, PermissionError, ProtocolAbort, SecurityError) as exc:
            return refusal(exc, request, v.client_id)

    @app.post("/v1/round/{rid}/{stage}")
    async def submit(rid: int, stage: str, request: Request):
        v, body, bad = await stage_request(rid, stage, request)
        return bad or await accept(v, rid, stage, body, request)

    # ------------------------------------------------------------------ chunked uploads
    @app.post("/v1/round/{rid}/{stage}/upload")
    async def upload_open(rid: int, stage: str, request: Request):
        v, body, bad = await stage_request(rid, stage, request)
        if bad:
            return bad
        try:
            size, sha = parse_declaration(parse_json(body), ctx.uploads)
            prev = await run_in_threadpool(ctx.store.get_upload, rid, stage, v.client_id)
            if prev is None or prev.status == "open":  # a committed one is answered as such, like a resent body
                await run_in_threadpool(ctx.engine.admissible, v.client_id, rid, stage)
            up, created = await run_in_threadpool(ctx.store.open_upload, rid, stage, v.client_id, size, sha,
                                                  ctx.uploads)
        except (LookupError, PermissionError, ProtocolAbort, SecurityError) as exc:
            return refusal(exc, request, v.client_id)
        ctx.audit.append("upload_open", {"round": rid, "stage": stage, "client": v.client_id, "size": size,
                                         "sha256": sha, "chunks": up.chunks, "resumed": not created,
                                         "held": len(up.have), "status": up.status})
        return up.to_reply()

    @app.get("/v1/round/{rid}/{stage}/upload")
    async def upload_state(rid: int, stage: str, request: Request):
        v, _, bad = await stage_request(rid, stage, request, ctype=None)
        if bad:
            return bad
        up = await run_in_threadpool(ctx.store.get_upload, rid, stage, v.client_id)
        if up is None:
            return _err(404, f"no upload is declared for round {rid} stage {stage}")
        return up.to_reply()

    @app.put("/v1/round/{rid}/{stage}/upload/{index}")
    async def upload_chunk(rid: int, stage: str, index: int, request: Request):
        v, body, bad = await stage_request(rid, stage, request, ctype="application/octet-stream")
        if bad:
            return bad
        try:
            dup = await run_in_threadpool(ctx.store.put_chunk, rid, stage, v.client_id, index, body)
        except (LookupError, ProtocolAbort) as exc:
            return refusal(exc, request, v.client_id)
        return {"index": index, "stored": True, "duplicate": dup}

    @app.post("/v1/round/{rid}/{stage}/upload/commit")
    async def upload_commit(rid: int, stage: str, request: Request):
        v, _, bad = await stage_request(rid, stage, request, ctype=None)
        if bad:
            return bad
        # a message already accepted for this stage (a single-body POST after the declaration) settles
        # the commit: answered as accepted only if it is the declared message (same SHA-256)
        settled = await run_in_threadpool(ctx.store.settle_upload, rid, stage, v.client_id)
        if settled is not None:
            verdict, have, up = settled
            info = {"round": rid, "stage": stage, "client": v.client_id, "size": up.size, "sha256": up.sha256,
                    "chunks": up.chunks}
            if verdict == "same":
                ctx.audit.append("upload_commit", {**info, "duplicate": True})
                return {"accepted": True, "round": rid, "stage": stage, "duplicate": True}
            await run_in_threadpool(ctx.store.discard_upload, rid, stage, v.client_id)
            reason = (f"a different message (sha256 {have[:16]}...) was already accepted for round {rid} stage "
                      f"{stage}; this upload (sha256 {up.sha256[:16]}...) is refused and was discarded")
            ctx.audit.append("upload_discard", {**info, "reason": reason})
            return reject(409, reason, request, v.client_id)
        try:
            up, data = await run_in_threadpool(ctx.store.upload_bytes, rid, stage, v.client_id)
        except LookupError as exc:
            return refusal(exc, request, v.client_id)
        if up.status == "committed":  # our message for this stage is in (a repeated commit whose reply was lost)
            return {"accepted": True, "round": rid, "stage": stage, "duplicate": True}
        if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), up.sha256):
            await run_in_threadpool(ctx.store.discard_upload, rid, stage, v.client_id)
            return reject(400, f"joined upload does not match its declared SHA-256 ({up.chunks} chunks, "
                               f"{len(data)} bytes); the upload was discarded, declare it again", request, v.client_id)
        res = await accept(v, rid, stage, data, request)  # on success the store marks the upload committed
        info = {"round": rid, "stage": stage, "client": v.client_id, "size": up.size, "sha256": up.sha256,
                "chunks": up.chunks}
        if isinstance(res, Response):  # refused (already audited): free the client's upload budget
            await run_in_threadpool(ctx.store.discard_upload, rid, stage, v.client_id)
            ctx.audit.append("upload_discard", {**info, "reason": json.loads(res.body).get("error", "")[:300]})
        else:
            ctx.audit.append("upload_commit", info)
        return res

    return app


def site_status(store: Storage, client_id: str) -> dict:
    """What ``GET /v1/status`` shows site ``client_id``: per round id, status, stage, cohort and survivor
    counts, whether *this* site dropped, and *its own* ε/δ; its own enrolment row. Guarantees: no other
    site's name, client id, dropout or ε appears (the operator's full view is :func:`status_summary`)."""
    rounds = []
    for r in store.rounds():
        dropped = {c for t in store.transitions(r.round_id) for c in t["data"].get("dropped", [])}
        own = store.client_reports(r.round_id).get(client_id) or {}
        rounds.append({"round": r.round_id, "status": r.status, "stage": r.stage,
                       "cohort": len(r.config.get("cohort", []) or []),
                       "survivors": len((r.result or {}).get("survivors", [])),
                       "dropped": client_id in dropped, "epsilon": own.get("epsilon"), "delta": own.get("delta"),
                       "reason": r.reason, "seconds": round((r.closed_at or time.time()) - r.opened_at, 3)})
    me = [c for c in store.clients() if c["client_id"] == client_id]
    for c in me:
        last = [x["epsilon"] for x in rounds if isinstance(x["epsilon"], (int, float))]
        c["epsilon"] = last[-1] if last else None
    return {"rounds": rounds, "client": me[0] if me else None}


def status_summary(store: Storage) -> dict:
    """Rounds (id, status, stage, survivors, dropouts, ε reported per client) and clients (latest ε), JSON-able."""
    rounds = []
    for r in store.rounds():
        dropped = sorted({c for t in store.transitions(r.round_id) for c in t["data"].get("dropped", [])})
        reps = store.client_reports(r.round_id)
        eps_by = {c: x.get("epsilon") for c, x in reps.items() if isinstance(x.get("epsilon"), (int, float))}
        eps = list(eps_by.values())
        rounds.append({"round": r.round_id, "status": r.status, "stage": r.stage,
                       "cohort": len(r.config.get("cohort", []) or []),
                       "survivors": len((r.result or {}).get("survivors", [])), "dropouts": dropped,
                       "epsilon_max": max(eps) if eps else None, "epsilon": eps_by,
                       "delta": next((x.get("delta") for x in reps.values() if x.get("delta") is not None), None),
                       "reason": r.reason,
                       "seconds": round((r.closed_at or time.time()) - r.opened_at, 3)})
    clients = store.clients()
    for c in clients:  # the latest ε each client reported (cumulative over its rounds when it keeps a budget)
        last = [r["epsilon"][c["client_id"]] for r in rounds if c["client_id"] in r["epsilon"]]
        c["epsilon"] = last[-1] if last else None
    return {"rounds": rounds, "clients": clients}
