"""TLS contexts for the federation: TLS 1.3 only, client certificates required on the server.

The server context refuses any handshake without a client certificate chaining to the
federation CA (``CERT_REQUIRED``). The client context verifies the server certificate against
the same CA and checks the host name.
"""

from __future__ import annotations

import os
import ssl
from typing import Callable


def server_ssl_context(cert: str | os.PathLike, key: str | os.PathLike, ca: str | os.PathLike,
                       crl: str | os.PathLike | None = None) -> ssl.SSLContext:
    """TLS 1.3-only server context demanding a client certificate signed by ``ca``.

    With ``crl`` (a PEM CRL signed by ``ca``, see ``pki.write_crl``) a client certificate whose serial it
    lists is refused at the handshake (``VERIFY_CRL_CHECK_LEAF``).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    from fedproxy_secure.artifacts.keyfiles import check_private_file

    check_private_file(key)  # refuses a group/world-accessible server.key (names chmod 600)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    if crl is not None:
        ctx.load_verify_locations(cafile=str(crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    return ctx


def enrol_ssl_context(cert: str | os.PathLike, key: str | os.PathLike) -> ssl.SSLContext:
    """TLS 1.3-only server context of the enrolment listener: the server authenticates itself, no client
    certificate is asked for (the site has none yet; it proves itself with its one-time token)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    from fedproxy_secure.artifacts.keyfiles import check_private_file

    check_private_file(key)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    return ctx


def client_ssl_context(ca: str | os.PathLike, cert: str | os.PathLike | None = None,
                       key: str | os.PathLike | None = None) -> ssl.SSLContext:
    """TLS 1.3-only client context verifying the server against ``ca``, presenting ``cert``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(ca))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert is not None:
        from fedproxy_secure.artifacts.keyfiles import check_private_file

        check_private_file(key if key else cert)  # refuses a group/world-accessible client.key
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def uvicorn_ssl_factory(cert, key, ca, crl=None) -> Callable:
    """An ``ssl_context_factory`` for ``uvicorn.Config`` returning :func:`server_ssl_context`."""

    def factory(_config, _default) -> ssl.SSLContext:
        return server_ssl_context(cert, key, ca, crl)

    return factory


def uvicorn_ssl_kwargs(cert, key, ca, crl=None) -> dict:
    """Keyword arguments for ``uvicorn.Config``: our TLS 1.3 mTLS context plus the plain fields
    (``crl``: a CA-signed CRL checked at every handshake, or None)."""
    return {
        "ssl_certfile": str(cert),
        "ssl_keyfile": str(key),
        "ssl_ca_certs": str(ca),
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_context_factory": uvicorn_ssl_factory(cert, key, ca, crl),
    }


def uvicorn_enrol_ssl_kwargs(cert, key) -> dict:
    """Keyword arguments for the enrolment listener's ``uvicorn.Config`` (:func:`enrol_ssl_context`)."""
    return {
        "ssl_certfile": str(cert),
        "ssl_keyfile": str(key),
        "ssl_cert_reqs": ssl.CERT_NONE,
        "ssl_context_factory": lambda _config, _default: enrol_ssl_context(cert, key),
    }
