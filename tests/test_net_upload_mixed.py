"""A client that mixes the two submission paths for one (round, stage): it declares a chunked
upload, then posts a single-body message. The later commit of the upload is answered "accepted"
only if the stored accepted message has the upload's SHA-256; otherwise it is refused with 409,
a reason naming both messages, the upload is discarded, and the refusal is audited.
Real server process over loopback mTLS, 16-byte chunks; round 1 stays at 'join' (min 4, 3 sites)."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest

from fedproxy_secure.auditlog import canonical_json, verify_log
from fedproxy_secure.client.join import ClientSession
from fedproxy_secure.server.store import SQLiteStore
from fedproxy_secure.server.uploads import UploadLimits
from tests.net_helpers import make_server, start_server, stop

CHUNK = 16
JOIN = {"type": "join", "epsilon_spent": 0.25}


def put_all(s: ClientSession, body: bytes, upto: int | None = None) -> None:
    n = -(-len(body) // CHUNK)
    for i in range(n if upto is None else upto):
        r = s.http.request("PUT", f"/v1/round/1/join/upload/{i}", body[i * CHUNK:(i + 1) * CHUNK], 1,
                           content_type="application/octet-stream")
        assert r.status == 200, r.content


def declare(s: ClientSession, body: bytes) -> None:
    r = s.http.post_json("/v1/round/1/join/upload", {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()},
                         round_id=1)
    assert r.status == 200 and r.json()["status"] == "open", r.content


def stored(d, client: str) -> bytes | None:
    con = sqlite3.connect(f"file:{d / 'state.db'}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT body FROM submissions WHERE round_id=1 AND stage='join' AND client_id=?",
                          (client,)).fetchone()
        return bytes(row[0]) if row else None
    finally:
        con.close()


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    d, port = make_server(tmp, 3, mode="plain", min_clients=4, deadlines={"join": 600})
    srv = start_server(d, port, ["--chunk-bytes", str(CHUNK)])
    yield d, tmp
    stop(srv)


def session(d, tmp, i: int) -> ClientSession:
    s = ClientSession(d / "enrol" / f"site{i}", tmp / f"c{i}", retry_s=5)
    s.enroll()
    return s


def test_commit_after_a_different_single_body_is_refused(fed):
    d, tmp = fed
    s = session(d, tmp, 0)
    try:
        up_body = b'{"type":"join","epsilon_spent":0.25' + b" " * 70 + b"}"   # 7 chunks
        up_sha = hashlib.sha256(up_body).hexdigest()
        declare(s, up_body)
        put_all(s, up_body)
        other = {"type": "join", "epsilon_spent": 0.5}  # a different message, by the single-body route
        r = s.http.request("POST", "/v1/round/1/join", json.dumps(other).encode(), 1)
        assert r.status == 200 and r.json()["accepted"] is True
        assert s.http.get("/v1/round/1/join/upload", round_id=1).json()["status"] == "open"  # not committed by it
        c = s.http.request("POST", "/v1/round/1/join/upload/commit", b"", 1)
        assert c.status == 409, c.content
        err = c.json()["error"]
        assert "different message" in err and "already accepted" in err and up_sha[:16] in err
        assert s.http.get("/v1/round/1/join/upload", round_id=1).status == 404  # discarded
        assert stored(d, s.client_id) == canonical_json(other)  # the accepted message is unchanged
        again = s.http.request("POST", "/v1/round/1/join/upload/commit", b"", 1)
        assert again.status == 409  # nothing to commit any more; never "accepted"
        cid = s.client_id
    finally:
        s.close()
    ev = [json.loads(x) for x in (d / "audit.jsonl").read_text().splitlines()]
    rej = [e["data"] for e in ev if e["event"] == "reject" and e["data"].get("client") == cid]
    assert any(x["status"] == 409 and "different message" in x["reason"] and x["path"].endswith("/upload/commit")
               for x in rej)
    disc = [e["data"] for e in ev if e["event"] == "upload_discard" and e["data"]["client"] == cid]
    assert len(disc) == 1 and disc[0]["sha256"] == up_sha and "different message" in disc[0]["reason"]
    assert not any(e["event"] == "upload_commit" and e["data"]["client"] == cid for e in ev)
    assert verify_log(d / "audit.jsonl").ok


def test_commit_after_the_same_message_by_single_body_is_accepted(fed):
    d, tmp = fed
    # site1: the upload holds the canonical bytes; the single body is the same message, other whitespace
    s = session(d, tmp, 1)
    try:
        body = canonical_json(JOIN)
        declare(s, body)
        put_all(s, body, upto=1)  # incomplete: the single body overtakes it
        r = s.http.request("POST", "/v1/round/1/join", json.dumps(JOIN, indent=2).encode(), 1)
        assert r.status == 200 and r.json()["accepted"] is True
        c = s.http.request("POST", "/v1/round/1/join/upload/commit", b"", 1)
        assert c.status == 200 and c.json()["accepted"] is True and c.json()["duplicate"] is True, c.content
        assert s.http.get("/v1/round/1/join/upload", round_id=1).json()["status"] == "committed"
        assert stored(d, s.client_id) == body
    finally:
        s.close()
    # site2: the single body carries exactly the declared bytes: that commits the upload at once
    s = session(d, tmp, 2)
    try:
        body = b'{"type":"join",  "epsilon_spent":0.25}'
        declare(s, body)
        r = s.http.request("POST", "/v1/round/1/join", body, 1)
        assert r.status == 200 and r.json()["accepted"] is True
        assert s.http.get("/v1/round/1/join/upload", round_id=1).json()["status"] == "committed"
        c = s.http.request("POST", "/v1/round/1/join/upload/commit", b"", 1)
        assert c.status == 200 and c.json()["duplicate"] is True
    finally:
        s.close()


def test_store_commits_an_upload_only_for_its_own_message(tmp_path):
    st = SQLiteStore(tmp_path / "state.db")
    lim = UploadLimits(chunk_bytes=4, max_bytes=100)
    st.open_round(1, "aa", "advertise", 1e12, {})
    mine = b'{"a":1}'
    st.open_upload(1, "advertise", "c1", len(mine), hashlib.sha256(mine).hexdigest(), lim)
    st.open_upload(1, "advertise", "c2", len(mine), hashlib.sha256(mine).hexdigest(), lim)
    assert st.settle_upload(1, "advertise", "c1") is None  # nothing accepted yet
    assert st.add_submission(1, "advertise", "c1", b'{"a":2}')
    assert st.get_upload(1, "advertise", "c1").status == "open"
    verdict, sha, up = st.settle_upload(1, "advertise", "c1")
    assert verdict == "different" and sha == hashlib.sha256(b'{"a":2}').hexdigest() and up.status == "open"
    # received bytes with the declared hash (raw_sha256) commit it, whatever the stored canonical form
    assert st.add_submission(1, "advertise", "c2", b'{"a": 1}', raw_sha256=hashlib.sha256(mine).hexdigest())
    assert st.get_upload(1, "advertise", "c2").status == "committed"
    assert st.settle_upload(1, "advertise", "c2") is None  # no open upload left to settle
    st.close()
