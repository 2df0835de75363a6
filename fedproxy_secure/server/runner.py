"""Run the federation server from its folder: uvicorn over TLS 1.3 with client certificates."""

from __future__ import annotations

import os
from pathlib import Path

from fedproxy_secure.artifacts.keys import load_operator_key
from fedproxy_secure.auditlog import AuditLog
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
    from fedproxy_secure.server.revocation import revocation_aware_lookup

    verifier = RequestVerifier(revocation_aware_lookup(d, store.client_key), store, skew_s=skew_s)  # revoked: clear 401
    return ServerContext(store=store, engine=engine, audit=audit, verifier=verifier,
                         bundle_dir=Path(bundle_dir) if bundle_dir else None, poll_s=poll_s, max_body=max_body,
                         uploads=uploads)


def serve(d: str | os.PathLike, host: str = "127.0.0.1", port: int = 8443, bundle_dir=None,
          max_body: int = 64 << 20, poll_s: float = 10.0, log_level: str = "warning",
          uploads: UploadLimits = UploadLimits(), enrol_port: int | None = None) -> None:
    """Serve the federation of folder ``d`` until interrupted (blocking).

    Body limits, checked before a body is read: ``max_body`` in general, 16 KiB for enrolment,
    ``uploads.chunk_bytes`` for an upload chunk and 4 KiB for an upload declaration or commit.
    """
    uvicorn_server(d, host, port, bundle_dir, max_body, poll_s, log_level, uploads, enrol_port)[0].run()


def uvicorn_server(d: str | os.PathLike, host: str = "127.0.0.1", port: int = 8443, bundle_dir=None,
                   max_body: int = 64 << 20, poll_s: float = 10.0, log_level: str = "warning",
                   uploads: UploadLimits = UploadLimits(), enrol_port: int | None = None):
    """``(uvicorn.Server, ServerContext)`` of :func:`serve`, not yet running (the caller may stop it).

    Never loads the CA key (it may be offline); the CRL ``DIR/pki/crl.pem``, when present, is checked at
    every handshake. While a site kit is unspent it also serves the CSR enrolment listener on
    ``enrol_port`` (default ``port + 1``; 0 turns it off), which reads the CA key only to sign a CSR.
    """
    import uvicorn

    from fedproxy_secure.server.app import BodyLimit

    p = server_paths(d)
    ctx = build_context(d, bundle_dir, poll_s=poll_s, max_body=max_body, uploads=uploads)
    app = BodyLimit(create_app(ctx), max_body, small_paths={"/v1/enroll": 16 << 10},
                    path_limits=[(CHUNK_PATH, uploads.chunk_bytes), (CONTROL_PATH, CONTROL_MAX_BODY)])
    from fedproxy_secure.server.revocation import revocation_paths

    crl = revocation_paths(d)["crl"]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_keep_alive=30,
                            **uvicorn_ssl_kwargs(p["cert"], p["key"], p["ca"], crl if crl.is_file() else None))
    return _with_enrolment_listener(config, d, ctx, host, port + 1 if enrol_port is None else enrol_port,
                                    log_level), ctx


def _with_enrolment_listener(config, d, ctx: ServerContext, host: str, enrol_port: int, log_level: str):
    """A ``uvicorn.Server`` for ``config`` that also serves the CSR enrolment listener on ``enrol_port``
    (``server/enrol_csr.py``) in a thread while it runs, if some site kit is unspent or some site enrolled with a
    CSR can renew its certificate (``server/renew.py``) (0: never)."""
    import threading

    import uvicorn

    from fedproxy_secure.server.enrol_csr import create_enrol_app, pending_kits
    from fedproxy_secure.transport.tls import uvicorn_enrol_ssl_kwargs

    from fedproxy_secure.server.renew import renewable_sites

    if not enrol_port or not (pending_kits(d) or renewable_sites(d)):
        return uvicorn.Server(config)
    p = server_paths(d)
    econf = uvicorn.Config(create_enrol_app(d, ctx.store, ctx.audit, ctx.verifier.skew_s), host=host,
                           port=enrol_port, log_level=log_level, access_log=False, timeout_keep_alive=5,
                           **uvicorn_enrol_ssl_kwargs(p["cert"], p["key"]))

    class _Server(uvicorn.Server):
        async def serve(self, sockets=None) -> None:
            enrol = uvicorn.Server(econf)
            th = threading.Thread(target=enrol.run, daemon=True, name="enrol-listener")
            th.start()
            try:
                await super().serve(sockets)
            finally:
                enrol.should_exit = True
                th.join(5)

    return _Server(config)


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
    ap.add_argument("--enrol-port", type=int, default=None,
                    help="CSR enrolment listener port (default: --port + 1; 0: off)")
    a = ap.parse_args(argv)
    serve(a.dir, a.host, a.port, a.bundle, a.max_body, a.poll,
          uploads=UploadLimits(chunk_bytes=a.chunk_bytes, max_bytes=a.max_upload), enrol_port=a.enrol_port)


if __name__ == "__main__":
    main()
