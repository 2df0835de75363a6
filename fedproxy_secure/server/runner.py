"""Run the federation server from its folder: uvicorn over TLS 1.3 with client certificates."""

from __future__ import annotations

import os
from pathlib import Path

from fedproxy_secure.artifacts.keys import load_operator_key
from fedproxy_secure.audit.log import AuditLog
from fedproxy_secure.server.app import ServerContext, create_app
from fedproxy_secure.server.rounds import ROUND_CONFIG_DOMAIN, RoundEngine, sign_round_config
from fedproxy_secure.server.setup import he_statement_key, load_settings, server_paths
from fedproxy_secure.server.store import SQLiteStore
from fedproxy_secure.server.uploads import CHUNK_PATH, CONTROL_MAX_BODY, CONTROL_PATH, UploadLimits
from fedproxy_secure.transport.signing import RequestVerifier
from fedproxy_secure.transport.tls import uvicorn_ssl_kwargs


def build_context(d: str | os.PathLike, bundle_dir: str | os.PathLike | None = None,
                  poll_s: float = 10.0, max_body: int = 64 << 20, skew_s: int = 120,
                  uploads: UploadLimits = UploadLimits()) -> ServerContext:
    """Open the store, audit log, operator key and round engine of server folder ``d``."""
    p = server_paths(d)
    settings = load_settings(d)
    store = SQLiteStore(p["db"])
    audit = AuditLog(p["audit"])
    op_key = load_operator_key(p["op_key"])
    he_key = he_statement_key(d) if settings.mode == "he" else None
    engine = RoundEngine(store, audit, settings, he_key=he_key,
                         signer=lambda cfg, domain=ROUND_CONFIG_DOMAIN: sign_round_config(op_key, cfg, domain))
    verifier = RequestVerifier(store.client_key, store, skew_s=skew_s)
    return ServerContext(store=store, engine=engine, audit=audit, verifier=verifier,
                         bundle_dir=Path(bundle_dir) if bundle_dir else None, poll_s=poll_s, max_body=max_body,
                         uploads=uploads)


def serve(d: str | os.PathLike, host: str = "127.0.0.1", port: int = 8443, bundle_dir=None,
          max_body: int = 64 << 20, poll_s: float = 10.0, log_level: str = "warning",
          uploads: UploadLimits = UploadLimits()) -> None:
    """Serve the federation of folder ``d`` until interrupted (blocking).

    Body limits, checked before a body is read: ``max_body`` in general, 16 KiB for enrolment,
    ``uploads.chunk_bytes`` for an upload chunk and 4 KiB for an upload declaration or commit.
    """
    uvicorn_server(d, host, port, bundle_dir, max_body, poll_s, log_level, uploads)[0].run()


def uvicorn_server(d: str | os.PathLike, host: str = "127.0.0.1", port: int = 8443, bundle_dir=None,
                   max_body: int = 64 << 20, poll_s: float = 10.0, log_level: str = "warning",
                   uploads: UploadLimits = UploadLimits()):
    """``(uvicorn.Server, ServerContext)`` of :func:`serve`, not yet running (the caller may stop it)."""
    import uvicorn

    from fedproxy_secure.server.app import BodyLimit

    p = server_paths(d)
    ctx = build_context(d, bundle_dir, poll_s=poll_s, max_body=max_body, uploads=uploads)
    app = BodyLimit(create_app(ctx), max_body, small_paths={"/v1/enroll": 16 << 10},
                    path_limits=[(CHUNK_PATH, uploads.chunk_bytes), (CONTROL_PATH, CONTROL_MAX_BODY)])
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_keep_alive=30, **uvicorn_ssl_kwargs(p["cert"], p["key"], p["ca"]))
    return uvicorn.Server(config), ctx


def main(argv: list[str] | None = None) -> None:
    """Light entry point (no typer/torch import): ``python -m fedproxy_secure.server.runner DIR``."""
    import argparse

    ap = argparse.ArgumentParser(description="fedproxy-secure federation server")
    ap.add_argument("dir")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8443)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--max-body", type=int, default=64 << 20)
    ap.add_argument("--poll", type=float, default=10.0)
    ap.add_argument("--chunk-bytes", type=int, default=UploadLimits.chunk_bytes, help="upload chunk size")
    ap.add_argument("--max-upload", type=int, default=UploadLimits.max_bytes,
                    help="declared bytes a client may hold in open uploads")
    a = ap.parse_args(argv)
    serve(a.dir, a.host, a.port, a.bundle, a.max_body, a.poll,
          uploads=UploadLimits(chunk_bytes=a.chunk_bytes, max_bytes=a.max_upload))


if __name__ == "__main__":
    main()
