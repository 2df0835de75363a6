"""HTTPS client of an enrolled site: mTLS (TLS 1.3) + an Ed25519 signature on every request.

Transient transport failures (server restarting, connection reset) are retried with backoff
for up to ``retry_s`` seconds; HTTP error statuses are returned to the caller, never retried
blindly, and each retry is a freshly signed request (new nonce, new timestamp).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from fedproxy_secure.errors import SecurityError
from fedproxy_secure.transport.signing import NO_ROUND, sign_request
from fedproxy_secure.transport.tls import client_ssl_context


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
        """Send one signed request (retrying transport errors); returns the reply."""
        deadline = time.monotonic() + self.retry_s
        delay = 0.2
        while True:
            headers = sign_request(self.identity, self.client_id, method, path, body, round_id)
            if body:
                headers["content-type"] = content_type
            try:
                r = self.http.request(method, self.base + path, content=body, headers=headers)
                return Reply(r.status_code, r.content)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 1.5, 2.0)

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
