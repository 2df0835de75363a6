"""HTTPS client of an enrolled site: mTLS (TLS 1.3) + an Ed25519 signature on every request.

Transient transport failures (server restarting, connection reset) are retried with backoff
for up to ``retry_s`` seconds, then end as one :class:`ServerUnreachable` line naming the URL
(every request and download goes through :func:`retry_transport`). HTTP error statuses are
returned to the caller, never retried blindly, and each retry is a freshly signed request (new
nonce, new timestamp).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import httpx

from fedproxy_secure.errors import FedProxyError, SecurityError
from fedproxy_secure.transport.signing import NO_ROUND, sign_request
from fedproxy_secure.transport.tls import client_ssl_context


T = TypeVar("T")


class ServerUnreachable(FedProxyError):
    """The federation server could not be reached within the retry window; the message names its URL."""


def retry_transport(attempt: Callable[[], T], url: str, retry_s: float, what: str = "request") -> T:
    """Run ``attempt()`` until it returns, retrying ``httpx.TransportError`` with backoff (0.2 s to 2 s).

    Guarantees: only transport failures are retried (an HTTP status or any other error propagates
    at once); after ``retry_s`` seconds the last failure becomes one :class:`ServerUnreachable`
    line naming ``what``, ``url``, the cause and the fix, never a raw httpx traceback. ``attempt``
    must be safe to repeat (sign afresh, restart a download from its beginning).
    """
    deadline = time.monotonic() + retry_s
    delay = 0.2
    while True:
        try:
            return attempt()
        except httpx.TransportError as exc:
            if time.monotonic() + delay > deadline:
                why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
                raise ServerUnreachable(f"{what}: cannot reach the federation server at {url} after {retry_s:g} s "
                                        f"({why}); check that the server is running and the URL (--server, or "
                                        "server.json of the enrolment)") from None
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)


@dataclass
class Reply:
    """Status code, raw body and (when JSON) parsed body of a reply."""

    status: int
    content: bytes

    def json(self):
        """Parsed JSON body."""
        return json.loads(self.content)


class SignedClient:
    """Signs and sends requests to the federation server over mutual TLS."""

    def __init__(self, base_url: str, ca: Path, cert: Path, key: Path, identity, client_id: str = "enroll",
                 retry_s: float = 120.0, timeout_s: float = 60.0) -> None:
        self.base = base_url.rstrip("/")
        self.identity, self.client_id, self.retry_s = identity, client_id, retry_s
        ctx = client_ssl_context(ca, cert, key)
        self.http = httpx.Client(verify=ctx, timeout=timeout_s, http2=False)

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def request(self, method: str, path: str, body: bytes = b"", round_id=NO_ROUND,
                content_type: str = "application/json") -> Reply:
        """Send one signed request (transport errors retried by :meth:`retrying`); returns the reply."""
        def attempt() -> Reply:
            headers = sign_request(self.identity, self.client_id, method, path, body, round_id)  # fresh nonce
            if body:
                headers["content-type"] = content_type
            r = self.http.request(method, self.base + path, content=body, headers=headers)
            return Reply(r.status_code, r.content)

        return self.retrying(attempt, f"{method} {path}")

    def retrying(self, attempt: Callable[[], T], what: str) -> T:
        """``attempt()`` under this client's retry policy (:func:`retry_transport` for ``retry_s`` seconds)."""
        return retry_transport(attempt, self.base, self.retry_s, what)

    def get(self, path: str, round_id=NO_ROUND) -> Reply:
        """Signed GET."""
        return self.request("GET", path, b"", round_id)

    def post_json(self, path: str, obj, round_id=NO_ROUND) -> Reply:
        """Signed POST of compact JSON."""
        return self.request("POST", path, json.dumps(obj, separators=(",", ":")).encode(), round_id)


def expect(reply: Reply, what: str, ok=(200,)) -> dict:
    """The JSON body of a successful reply, else ``SecurityError`` naming ``what`` and the status."""
    if reply.status not in ok:
        try:
            msg = reply.json().get("error", "")
        except ValueError:
            msg = reply.content[:200]
        raise SecurityError(f"{what}: server answered {reply.status}: {msg}")
    return reply.json()
