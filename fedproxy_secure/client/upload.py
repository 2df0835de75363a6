"""Client side of posting a stage message: one body, or a chunked resumable upload when large.

Above ``threshold`` bytes the message is declared (size + SHA-256), sent in the chunk size the
server names, and committed (protocol in ``server/uploads.py``). Every chunk is its own signed
request; :class:`~fedproxy_secure.transport.http.SignedClient` retries transport errors with a
fresh signature. If the connection stays down longer than that, the upload starts over by
declaring again: the server answers with the chunks it already holds, and only the others are
sent. The bytes are the compact JSON a single body would carry (no pickle).
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import httpx

from fedproxy_secure.errors import SecurityError
from fedproxy_secure.transport.http import Reply, ServerUnreachable, SignedClient

DEFAULT_THRESHOLD = 4 << 20
#: progress(bytes the server holds, total bytes) after each chunk
UploadProgress = Callable[[int, int], None]


def post_stage_message(http: SignedClient, rid: int, stage: str, msg: dict, threshold: int = DEFAULT_THRESHOLD,
                       progress: UploadProgress | None = None, attempts: int = 5) -> Reply:
    """Post ``msg`` for ``(rid, stage)``; the server's final reply (200 when accepted).

    A body of at most ``threshold`` bytes goes as one request, a larger one by :func:`upload`.
    """
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) <= threshold:
        return http.request("POST", f"/v1/round/{rid}/{stage}", body, rid)
    return upload(http, rid, stage, body, progress, attempts)


def upload(http: SignedClient, rid: int, stage: str, body: bytes, progress: UploadProgress | None = None,
           attempts: int = 5) -> Reply:
    """Upload ``body`` (JSON bytes) in chunks and commit it; resumes where the server stands.

    Returns the first refusal (any non-200 reply) or the commit reply. Gives up, re-raising the
    transport error, after ``attempts`` declarations in a row end in a lost connection. Raises
    ``SecurityError`` if the server describes an upload other than the one declared.
    """
    base = f"/v1/round/{rid}/{stage}/upload"
    size, sha = len(body), hashlib.sha256(body).hexdigest()
    attempts = max(1, attempts)
    for attempt in range(attempts):
        try:
            r = http.post_json(base, {"size": size, "sha256": sha}, round_id=rid)
            if r.status != 200:
                return r
            st = r.json()
            cs = st.get("chunk_size")
            if st.get("size") != size or st.get("sha256") != sha or not isinstance(cs, int) or cs < 1:
                raise SecurityError(f"round {rid} stage {stage}: the server describes another upload: {st}")
            if st.get("status") == "open":
                held = {i for i in st.get("have", []) if isinstance(i, int)}
                done = sum(len(body[i * cs:(i + 1) * cs]) for i in held)
                for i in range(-(-size // cs)):
                    if i in held:
                        continue
                    part = body[i * cs:(i + 1) * cs]
                    r = http.request("PUT", f"{base}/{i}", part, rid, content_type="application/octet-stream")
                    if r.status != 200:
                        return r
                    done += len(part)
                    if progress:
                        progress(done, size)
            return http.request("POST", f"{base}/commit", b"", rid)
        except (httpx.TransportError, ServerUnreachable):  # the server stayed away for retry_s
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")
