"""Refusals over the real TLS socket: handshake, signatures, replays, clocks, sizes, JSON, rounds."""

from __future__ import annotations

import json
import ssl
import time

import httpx
import pytest

from fedproxy_secure.client.join import ClientSession
from fedproxy_secure.transport.pki import create_ca, issue_client_cert
from fedproxy_secure.transport.signing import sign_request
from fedproxy_secure.transport.tls import client_ssl_context
from tests.net_helpers import make_server, start_server, stop


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refusals")
    d, port = make_server(tmp, 2, min_clients=3)
    srv = start_server(d, port, ["--max-body", "65536"])
    s = ClientSession(d / "enrol" / "site0", tmp / "c0", retry_s=5)
    s.enroll()
    yield d, port, s, tmp
    s.close()
    stop(srv)


def _url(port, path):
    return f"https://127.0.0.1:{port}{path}"


def _ctx(d, with_cert=True):
    e = d / "enrol" / "site0"
    return client_ssl_context(e / "ca.pem", e / "client.pem" if with_cert else None, e / "client.key" if with_cert else None)


def test_no_client_certificate_is_refused_at_handshake(fed):
    d, port, _, _ = fed
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.get(_url(port, "/v1/federation"), verify=_ctx(d, with_cert=False), timeout=5)


def test_certificate_of_another_ca_is_refused(fed, tmp_path):
    d, port, _, _ = fed
    other = create_ca(tmp_path / "evil")
    pair = issue_client_cert(other, "mallory", tmp_path / "evil")
    ctx = client_ssl_context(d / "enrol" / "site0" / "ca.pem", pair.cert, pair.key)
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.get(_url(port, "/v1/federation"), verify=ctx, timeout=5)


def test_tls12_is_refused(fed):
    d, port, _, _ = fed
    ctx = _ctx(d)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.get(_url(port, "/v1/federation"), verify=ctx, timeout=5)


def test_signed_request_accepted_then_unsigned_replayed_expired_refused(fed):
    d, port, s, _ = fed
    with httpx.Client(verify=_ctx(d), timeout=10) as c:
        h = sign_request(s.key, s.client_id, "GET", "/v1/federation", b"")
        ok = c.get(_url(port, "/v1/federation"), headers=h)
        assert ok.status_code == 200 and "rounds_total" in ok.json()
        replay = c.get(_url(port, "/v1/federation"), headers=h)
        assert replay.status_code == 401 and "replay" in replay.json()["error"]
        unsigned = c.get(_url(port, "/v1/federation"))
        assert unsigned.status_code == 401 and "unsigned" in unsigned.json()["error"]
        old = sign_request(s.key, s.client_id, "GET", "/v1/federation", b"", now=time.time() - 3600)
        r = c.get(_url(port, "/v1/federation"), headers=old)
        assert r.status_code == 401 and "window" in r.json()["error"]
        # signature over another path / body is refused
        h2 = sign_request(s.key, s.client_id, "GET", "/v1/status", b"")
        assert c.get(_url(port, "/v1/federation"), headers=h2).status_code == 401
        # unknown client id
        h3 = sign_request(s.key, "c-doesnotexist", "GET", "/v1/federation", b"")
        assert c.get(_url(port, "/v1/federation"), headers=h3).status_code == 401


def test_oversized_body_refused_before_reading(fed):
    d, port, s, _ = fed
    big = b"{" + b" " * 200_000 + b"}"
    with httpx.Client(verify=_ctx(d), timeout=10) as c:
        h = sign_request(s.key, s.client_id, "POST", "/v1/round/1/join", big, round_id=1)
        r = c.post(_url(port, "/v1/round/1/join"), content=big, headers={**h, "content-type": "application/json"})
        assert r.status_code == 413

        def chunks():  # no Content-Length: streamed body cut at the limit
            for _ in range(20):
                yield b" " * 10_000

        r2 = c.post(_url(port, "/v1/round/1/join"), content=chunks(), headers={**h, "content-type": "application/json"})
        assert r2.status_code == 413


def test_malformed_json_and_wrong_round_refused(fed):
    d, port, s, _ = fed
    with httpx.Client(verify=_ctx(d), timeout=10) as c:
        for body in (b"{not json", b'{"type": NaN}', b'{"a":1,"a":2}', b"[" * 100 + b"]" * 100):
            h = sign_request(s.key, s.client_id, "POST", "/v1/round/1/join", body, round_id=1)
            r = c.post(_url(port, "/v1/round/1/join"), content=body, headers={**h, "content-type": "application/json"})
            assert r.status_code == 400, (body[:20], r.text)
        body = b'{"type":"join"}'
        h = sign_request(s.key, s.client_id, "POST", "/v1/round/1/join", body, round_id=1)
        r = c.post(_url(port, "/v1/round/1/join"), content=body, headers={**h, "content-type": "text/plain"})
        assert r.status_code == 415
        h = sign_request(s.key, s.client_id, "POST", "/v1/round/99/join", body, round_id=99)
        r = c.post(_url(port, "/v1/round/99/join"), content=body, headers={**h, "content-type": "application/json"})
        assert r.status_code == 409 and "wrong round" in r.json()["error"]
        h = sign_request(s.key, s.client_id, "POST", "/v1/round/1/join", body, round_id=2)  # header != path
        r = c.post(_url(port, "/v1/round/1/join"), content=body, headers={**h, "content-type": "application/json"})
        assert r.status_code == 409
        # protocol stage out of order (round 1 is at 'join')
        h = sign_request(s.key, s.client_id, "POST", "/v1/round/1/advertise", body, round_id=1)
        r = c.post(_url(port, "/v1/round/1/advertise"), content=body, headers={**h, "content-type": "application/json"})
        assert r.status_code in (403, 409)


def test_enrolment_token_is_one_time(fed):
    d, port, s, tmp = fed
    # reuse site0's spent token with a new identity
    s2 = ClientSession(d / "enrol" / "site0", tmp / "c0-again", retry_s=5)
    try:
        with pytest.raises(Exception, match="already used"):
            s2.enroll()
    finally:
        s2.close()
    lines = [json.loads(x) for x in (d / "audit.jsonl").read_text().splitlines()]
    assert any(e["event"] == "reject" and "already used" in e["data"]["reason"] for e in lines)


def test_no_route_serves_llm_weights():
    from fedproxy_secure.server.app import ServerContext, create_app

    app = create_app(ServerContext(store=None, engine=None, audit=None, verifier=None))  # type: ignore[arg-type]
    paths = sorted(getattr(r, "path", "") for r in app.routes)
    assert paths, paths
    for p in paths:
        low = p.lower()
        assert not any(w in low for w in ("llm", "fuse", "fused", "weights", "model", "compress")), p
    # the only file-serving route is the proxy bundle, restricted to manifest-listed files
    assert [p for p in paths if p.startswith("/v1/bundle")] == ["/v1/bundle/{name:path}"]
