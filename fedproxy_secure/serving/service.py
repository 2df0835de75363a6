"""Start ``server serve-model``: verify and load the fused folder, then uvicorn with the federation's mTLS.

Who may call: the TLS layer demands a client certificate signed by the federation CA at the
handshake (the federation server's own TLS 1.3 context, ``transport.tls``), so a site without one
never reaches a route; the peer certificate is handed to the app in the ASGI TLS extension, and
:mod:`fedproxy_secure.serving.access` binds each request to its site.

The model is loaded only through :func:`fedproxy_secure.fuse.load_fused_model` against the
federation's pinned keyset, so nothing unsigned is ever parsed or served.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fedproxy_secure.errors import ConfigError
from fedproxy_secure.server.setup import server_paths
from fedproxy_secure.serving.access import TLS_EXT, revocation_check
from fedproxy_secure.serving.app import ServeContext, create_serve_app
from fedproxy_secure.serving.audit_sink import AuditSink, tokens_used_since
from fedproxy_secure.serving.limits import DAY_S, TokenQuota
from fedproxy_secure.serving.settings import ServeSettings


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
    every file hash verified before any byte was parsed); the audit log (every segment) verified once
    here, and the store are the server folder's; each site's daily token count starts from what the
    log shows for today (UTC), so a restart does not reset a quota. ConfigError naming the option when
    the folder or the keyset is missing.
    """
    from fedproxy_secure.fuse import load_fused_model

    p = server_paths(server_dir)
    for k in ("ca", "cert", "key", "db"):
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
    sink = AuditSink(p["audit"], segment_bytes=settings.audit_segment_bytes)
    now = time.time()
    quota = TokenQuota(settings, used=tokens_used_since(p["audit"], now - now % DAY_S))
    return ServeContext(model=model, tokenizer=model.tokenizer, model_id=model_id, settings=settings,
                        db=p["db"], audit=sink, quota=quota, access=revocation_check(server_dir))


def uvicorn_serve_server(ctx: ServeContext, server_dir: str | os.PathLike, host: str = "127.0.0.1",
                         port: int = 8445, log_level: str = "warning", exit_after: int | None = None):
    """A ``uvicorn.Server`` (not yet running) serving ``ctx`` with the federation's mTLS context.

    The handshake demands a client certificate of the federation CA and, when ``pki/crl.pem`` exists
    (``server revoke-site``), refuses the certificates it lists; revocations made after start are
    refused per request (:func:`~fedproxy_secure.serving.access.revocation_check` and the store's
    enrolment status). With ``exit_after`` the server stops after that many completions were served
    (scripts, tests).
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
