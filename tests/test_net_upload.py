"""Chunked, resumable uploads of stage messages over the real TLS socket (tiny chunks configured).

A masked round sent entirely as chunked uploads gives the plaintext sum; an interrupted upload is
resumed with only the missing chunks; conflicting, replayed, oversized, wrong-hash and late
chunks are refused with reasons (audited); chunks survive a SIGKILL of the server; per-client
limits and the discarding of uploads when a stage or round closes are checked on the store.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3

import httpx
import numpy as np
import pytest

from fedproxy_secure.auditlog import canonical_json, verify_log
from fedproxy_secure.client.join import ClientSession
from fedproxy_secure.client.upload import upload
from fedproxy_secure.server.store import SQLiteStore
from fedproxy_secure.server.uploads import UploadLimits
from fedproxy_secure.transport.signing import sign_request
from tests.net_helpers import (db_rounds, expected_sum, make_server, result_sum, roster_policy, start_client,
                               start_server, stop,
                               wait_for)

CHUNK = 16
JOIN = {"type": "join", "epsilon_spent": 0.25}


def join_body(pad: int = 70) -> bytes:
    """A valid join message as JSON with padding whitespace (so it spans several tiny chunks)."""
    return b'{"type":"join","epsilon_spent":0.25' + b" " * pad + b"}"


def decl(body: bytes, sha: str | None = None) -> dict:
    return {"size": len(body), "sha256": sha or hashlib.sha256(body).hexdigest()}


def audit(d) -> list[dict]:
    return [json.loads(x) for x in (d / "audit.jsonl").read_text().splitlines()]


def stored(d, stage: str, client: str) -> bytes | None:
    con = sqlite3.connect(f"file:{d / 'state.db'}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT body FROM submissions WHERE round_id=1 AND stage=? AND client_id=?",
                          (stage, client)).fetchone()
        return bytes(row[0]) if row else None
    finally:
        con.close()


class Counting:
    """Wraps a SignedClient: counts chunk PUTs actually delivered; can drop the connection once
    right after the ``fail_after``-th PUT reached the server (the reply is lost)."""

    def __init__(self, http, fail_after: int | None = None) -> None:
        self.http, self.fail_after, self.puts, self.declares = http, fail_after, 0, 0

    def request(self, method, path, body=b"", round_id="-", content_type="application/json"):
        r = self.http.request(method, path, body, round_id, content_type)
        if method == "PUT":
            self.puts += 1
            if self.puts == self.fail_after:
                raise httpx.ReadError("connection lost after the chunk was sent")
        return r

    def post_json(self, path, obj, round_id="-"):
        self.declares += path.endswith("/upload")
        return self.request("POST", path, json.dumps(obj, separators=(",", ":")).encode(), round_id)


def session(d, tmp, i: int, retry_s: float = 5.0) -> ClientSession:
    s = ClientSession(d / "enrol" / f"site{i}", tmp / f"c{i}", retry_s=retry_s)
    s.enroll()
    return s


# ---------------------------------------------------------------- a whole round by chunked upload
def test_chunked_masking_round_equals_plaintext_sum(tmp_path):
    d, port = make_server(tmp_path, 3, rounds=1)
    srv = start_server(d, port, ["--chunk-bytes", "64"])
    try:
        clients = [start_client(d, i, tmp_path, extra=["--upload-threshold", "32"]) for i in range(3)]
        for c in clients:
            c.wait(90)
            assert c.returncode == 0, (tmp_path / "client0.log").read_text()[-2000:]
        rounds = db_rounds(d)
        assert [r[1] for r in rounds] == ["done"]
        res = rounds[0][3]
        assert len(json.loads(res)["survivors"]) == 3
        np.testing.assert_allclose(result_sum(res), expected_sum(range(3), 1, 8), atol=1e-8)
    finally:
        stop(srv)
    assert verify_log(d / "audit.jsonl").ok
    ev = audit(d)
    accepts = [e["data"] for e in ev if e["event"] == "accept" and e["data"]["stage"] != "join"]
    commits = [e["data"] for e in ev if e["event"] == "upload_commit"]
    assert len(accepts) == 15  # 3 clients x 5 masking stages
    # every stage message came as a chunked upload, most of them in several chunks
    assert sorted((c["client"], c["stage"]) for c in commits) == sorted((a["client"], a["stage"]) for a in accepts)
    assert all(c["chunks"] >= 2 for c in commits if c["stage"] in ("share", "masked_input", "advertise"))
    assert not [e for e in ev if e["event"] in ("reject", "upload_discard")]


def test_chunked_he_round_within_tolerance(tmp_path):
    """HE envelopes and the key holder's descriptor (hundreds of KB) arrive in 64 KiB chunks."""
    deadlines = {"join": 20, "he_keys": 30, "he_input": 20, "he_decrypt": 30}
    d, port = make_server(tmp_path, 3, mode="he", rounds=1, deadlines=deadlines)
    srv = start_server(d, port, ["--chunk-bytes", str(64 << 10)])
    try:
        pol = ["--policy", str(roster_policy(tmp_path, 3))]  # HE needs a roster
        clients = [start_client(d, i, tmp_path, extra=["--upload-threshold", str(64 << 10), *pol]) for i in range(3)]
        for c in clients:
            c.wait(120)
            assert c.returncode == 0
        (rid, status, _, res), = db_rounds(d)
        assert status == "done" and len(json.loads(res)["survivors"]) == 3
        err = np.max(np.abs(result_sum(res) - expected_sum(range(3), 1, 8)))
        assert err <= json.loads(res)["he"]["stated_tolerance"]
    finally:
        stop(srv)
    commits = [e["data"] for e in audit(d) if e["event"] == "upload_commit"]
    inputs = [c for c in commits if c["stage"] == "he_input"]
    assert len(inputs) == 3 and all(c["chunks"] >= 2 for c in inputs), commits
    assert any(c["stage"] == "he_keys" and c["chunks"] >= 2 for c in commits)


# ---------------------------------------------------------------- refusals and resume, one server
@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upload")
    # 6 sites, min 6: round 1 stays at 'join' for the whole module (nobody else joins)
    d, port = make_server(tmp, 6, mode="plain", min_clients=6, deadlines={"join": 600})
    srv = start_server(d, port, ["--chunk-bytes", str(CHUNK), "--max-upload", "4096", "--max-body", "65536"])
    yield d, port, tmp
    stop(srv)


def test_interrupted_upload_resumes_with_only_missing_chunks(fed):
    d, _, tmp = fed
    body = join_body()
    n = -(-len(body) // CHUNK)
    assert n == 7
    s = session(d, tmp, 0)
    r = s.http.post_json("/v1/round/1/join/upload", decl(body), round_id=1)
    assert r.status == 200 and r.json()["chunks"] == n and r.json()["have"] == [] and r.json()["chunk_size"] == CHUNK
    for i in range(3):
        assert s.http.request("PUT", f"/v1/round/1/join/upload/{i}", body[i * CHUNK:(i + 1) * CHUNK], 1,
                              content_type="application/octet-stream").status == 200
    cid = s.client_id
    s.close()  # the client goes away mid-upload

    s2 = ClientSession(d / "enrol" / "site0", tmp / "c0", retry_s=5)  # restarted from its state dir
    try:
        st = s2.http.get("/v1/round/1/join/upload", round_id=1)
        assert st.status == 200 and st.json()["have"] == [0, 1, 2] and st.json()["status"] == "open"
        http = Counting(s2.http)
        seen = []
        r = upload(http, 1, "join", body, progress=lambda done, total: seen.append((done, total)))
        assert r.status == 200 and r.json()["accepted"] is True, r.content
        assert http.puts == n - 3  # only the missing chunks went over the wire
        assert seen[-1] == (len(body), len(body)) and len(seen) == n - 3
        # accepted through the single-body path: stored as the canonical message
        assert stored(d, "join", cid) == canonical_json(JOIN)
        again = s2.http.request("POST", "/v1/round/1/join/upload/commit", b"", 1)  # a repeated commit
        assert again.status == 200 and again.json()["duplicate"] is True
        assert s2.http.get("/v1/round/1/join/upload", round_id=1).json()["status"] == "committed"
    finally:
        s2.close()
    ev = audit(d)
    opened = [e["data"] for e in ev if e["event"] == "upload_open" and e["data"]["client"] == cid]
    assert [o["resumed"] for o in opened] == [False, True] and opened[1]["held"] == 3
    assert any(e["event"] == "upload_commit" and e["data"]["client"] == cid for e in ev)
    assert any(e["event"] == "accept" and e["data"]["client"] == cid and e["data"]["stage"] == "join" for e in ev)


def test_lost_connection_mid_upload_resumes_without_resending(fed):
    d, _, tmp = fed
    s = session(d, tmp, 1)
    try:
        body = join_body(90)
        n = -(-len(body) // CHUNK)
        http = Counting(s.http, fail_after=3)  # the 3rd chunk reaches the server, its reply is lost
        r = upload(http, 1, "join", body)
        assert r.status == 200 and r.json()["accepted"] is True
        assert http.puts == n and http.declares == 2  # declared again, no chunk sent twice
        assert stored(d, "join", s.client_id) == canonical_json(JOIN)
    finally:
        s.close()


def test_conflicting_and_replayed_chunks_refused(fed):
    d, port, tmp = fed
    s = session(d, tmp, 2)
    try:
        body = join_body()
        assert s.http.post_json("/v1/round/1/join/upload", decl(body), round_id=1).status == 200
        url, path = f"https://127.0.0.1:{port}/v1/round/1/join/upload/0", "/v1/round/1/join/upload/0"
        hdr = {**sign_request(s.key, s.client_id, "PUT", path, body[:CHUNK], 1),
               "content-type": "application/octet-stream"}
        first = s.http.http.put(url, content=body[:CHUNK], headers=hdr)
        assert first.status_code == 200 and first.json()["duplicate"] is False
        replay = s.http.http.put(url, content=body[:CHUNK], headers=hdr)  # the same signed request again
        assert replay.status_code == 401 and "replay" in replay.json()["error"]
        ident = s.http.request("PUT", path, body[:CHUNK], 1, content_type="application/octet-stream")
        assert ident.status == 200 and ident.json()["duplicate"] is True  # identical resend is fine
        other = s.http.request("PUT", path, b"X" * CHUNK, 1, content_type="application/octet-stream")
        assert other.status == 409 and "different content" in other.json()["error"]
        short = s.http.request("PUT", "/v1/round/1/join/upload/1", b"{}", 1, content_type="application/octet-stream")
        assert short.status == 400 and "must have 16" in short.json()["error"]
        beyond = s.http.request("PUT", "/v1/round/1/join/upload/99", b"x", 1, content_type="application/octet-stream")
        assert beyond.status == 400 and "out of range" in beyond.json()["error"]
        as_json = s.http.request("PUT", "/v1/round/1/join/upload/1", body[CHUNK:2 * CHUNK], 1)
        assert as_json.status == 415
        redeclare = s.http.post_json("/v1/round/1/join/upload", decl(join_body(10)), round_id=1)
        assert redeclare.status == 409 and "another message" in redeclare.json()["error"]
        assert s.http.get("/v1/round/1/join/upload", round_id=1).json()["have"] == [0]
    finally:
        s.close()
    rej = [e["data"] for e in audit(d) if e["event"] == "reject" and e["data"].get("client") == s.client_id]
    assert any("different content" in x["reason"] for x in rej)
    assert any("another message" in x["reason"] for x in rej)


def test_wrong_total_hash_refused_and_discarded(fed):
    d, _, tmp = fed
    s = session(d, tmp, 3)
    try:
        body = join_body()
        lie = hashlib.sha256(body + b"!").hexdigest()
        assert s.http.post_json("/v1/round/1/join/upload", decl(body, lie), round_id=1).status == 200
        for i in range(-(-len(body) // CHUNK)):
            assert s.http.request("PUT", f"/v1/round/1/join/upload/{i}", body[i * CHUNK:(i + 1) * CHUNK], 1,
                                  content_type="application/octet-stream").status == 200
        r = s.http.request("POST", "/v1/round/1/join/upload/commit", b"", 1)
        assert r.status == 400 and "declared SHA-256" in r.json()["error"]
        assert s.http.get("/v1/round/1/join/upload", round_id=1).status == 404  # chunks discarded
        assert stored(d, "join", s.client_id) is None
        incomplete = s.http.post_json("/v1/round/1/join/upload", decl(body), round_id=1)
        assert incomplete.status == 200  # may start again
        r = s.http.request("POST", "/v1/round/1/join/upload/commit", b"", 1)
        assert r.status == 409 and "7 of 7 chunks missing" in r.json()["error"]
    finally:
        s.close()
    assert any(e["event"] == "reject" and "declared SHA-256" in e["data"]["reason"] for e in audit(d))


def test_oversized_chunk_and_declaration_refused_before_read(fed):
    d, port, tmp = fed
    s = session(d, tmp, 4)
    try:
        body = join_body()
        assert s.http.post_json("/v1/round/1/join/upload", decl(body), round_id=1).status == 200
        big = b"x" * 100_000
        path = "/v1/round/1/join/upload/0"
        hdr = {**sign_request(s.key, s.client_id, "PUT", path, big, 1), "content-type": "application/octet-stream"}
        r = s.http.http.put(f"https://127.0.0.1:{port}{path}", content=big, headers=hdr)
        assert r.status_code == 413 and f"{CHUNK}-byte limit" in r.json()["error"]

        def stream():  # no Content-Length: cut off once past the chunk limit
            for _ in range(10):
                yield b"y" * 1000

        r = s.http.http.put(f"https://127.0.0.1:{port}{path}", content=stream(), headers=hdr)
        assert r.status_code == 413
        assert s.http.get("/v1/round/1/join/upload", round_id=1).json()["have"] == []
        # a declaration beyond the client's byte limit (4096, the whole budget) ...
        s5 = session(d, tmp, 5)
        try:
            r = s5.http.post_json("/v1/round/1/join/upload", {"size": 5000, "sha256": "0" * 64}, round_id=1)
            assert r.status == 403 and "limit is 4096" in r.json()["error"]
            r = s5.http.post_json("/v1/round/1/join/upload", {"size": 10, "sha256": "0" * 64, "x": "y" * 5000},
                                  round_id=1)
            assert r.status == 413  # declaration bodies are bounded to 4 KiB
            r = s5.http.post_json("/v1/round/1/join/upload", {"size": 10, "sha256": "XYZ"}, round_id=1)
            assert r.status == 400 and "64 lowercase hex" in r.json()["error"]
            r = s5.http.post_json("/v1/round/1/masked_input/upload", decl(body), round_id=1)
            assert r.status == 409 and "stage 'join'" in r.json()["error"]  # not the current stage
        finally:
            s5.close()
    finally:
        s.close()


# ---------------------------------------------------------------- restart, then a late chunk
def test_upload_survives_server_restart_and_late_chunk_is_refused(tmp_path):
    d, port = make_server(tmp_path, 3, mode="plain", min_clients=2, deadlines={"join": 12, "masked_input": 600})
    srv = start_server(d, port, ["--chunk-bytes", str(CHUNK)])
    s0 = s1 = s2 = None
    try:
        s0, s1, s2 = (session(d, tmp_path, i, retry_s=30) for i in range(3))
        body = join_body()
        n = -(-len(body) // CHUNK)
        assert s0.http.post_json("/v1/round/1/join/upload", decl(body), round_id=1).status == 200
        for i in range(4):
            assert s0.http.request("PUT", f"/v1/round/1/join/upload/{i}", body[i * CHUNK:(i + 1) * CHUNK], 1,
                                   content_type="application/octet-stream").status == 200
        srv.send_signal(signal.SIGKILL)  # no clean shutdown: the acked chunks must be on disk
        srv.wait()
        srv = start_server(d, port, ["--chunk-bytes", str(CHUNK)])
        st = s0.http.get("/v1/round/1/join/upload", round_id=1)
        assert st.status == 200 and st.json()["have"] == [0, 1, 2, 3]
        http = Counting(s0.http)
        r = upload(http, 1, "join", body)
        assert r.status == 200 and r.json()["accepted"] is True and http.puts == n - 4
        assert stored(d, "join", s0.client_id) == canonical_json(JOIN)

        # site 1 is slow: its join upload is still incomplete when the join deadline closes the stage
        assert s1.http.post_json("/v1/round/1/join/upload", decl(body), round_id=1).status == 200
        assert s1.http.request("PUT", "/v1/round/1/join/upload/0", body[:CHUNK], 1,
                               content_type="application/octet-stream").status == 200
        assert s2.http.post_json("/v1/round/1/join", JOIN, round_id=1).status == 200
        wait_for(lambda: any(r[0] == 1 and r[2] == "masked_input" for r in db_rounds(d)), 30, "join to close")
        late = s1.http.request("PUT", "/v1/round/1/join/upload/1", body[CHUNK:2 * CHUNK], 1,
                               content_type="application/octet-stream")
        assert late.status == 409 and "at stage 'masked_input', not 'join'" in late.json()["error"]
        assert s1.http.get("/v1/round/1/join/upload", round_id=1).status == 404  # discarded with the stage
        again = s1.http.post_json("/v1/round/1/join/upload", decl(body), round_id=1)
        assert again.status == 409
        commit = s1.http.request("POST", "/v1/round/1/join/upload/commit", b"", 1)
        assert commit.status == 409
    finally:
        stop(srv)
        for s in (s0, s1, s2):
            if s is not None:
                s.close()
    assert verify_log(d / "audit.jsonl").ok
    ev = audit(d)
    assert "round_resume" in [e["event"] for e in ev]
    gone = [e["data"] for e in ev if e["event"] == "upload_discard"]
    assert gone == [{"round": 1, "stage": "join", "client": s1.client_id, "size": len(body),
                     "reason": "stage join closed"}]
    assert any(e["event"] == "reject" and "not 'join'" in e["data"]["reason"] for e in ev)


# ---------------------------------------------------------------- store rules (no socket)
def test_store_limits_and_cleanup(tmp_path):
    st = SQLiteStore(tmp_path / "state.db")
    lim = UploadLimits(chunk_bytes=4, max_bytes=100, max_open=1)
    st.open_round(1, "aa", "advertise", 1e12, {})
    st.open_round(2, "bb", "join", 1e12, {})
    up, created = st.open_upload(1, "advertise", "c1", 10, "0" * 64, lim)
    assert created and up.chunks == 3
    assert st.open_upload(1, "advertise", "c1", 10, "0" * 64, lim) == (up, False)  # resume
    with pytest.raises(PermissionError, match="1 open upload"):
        st.open_upload(2, "join", "c1", 10, "1" * 64, lim)
    with pytest.raises(PermissionError, match="limit is 100"):
        st.open_upload(2, "join", "c2", 101, "1" * 64, lim)
    with pytest.raises(LookupError, match="not 'share'"):
        st.open_upload(1, "share", "c2", 10, "1" * 64, lim)
    st.open_upload(1, "advertise", "c2", 10, hashlib.sha256(b"{}").hexdigest(), lim)
    st.put_chunk(1, "advertise", "c2", 0, b"abcd")
    assert st.add_submission(1, "advertise", "c2", b"{}")  # accepting the declared message commits the upload
    assert st.get_upload(1, "advertise", "c2").status == "committed"
    with pytest.raises(LookupError, match="already committed"):
        st.put_chunk(1, "advertise", "c2", 1, b"efgh")
    gone = st.advance_stage(1, "share", 1e12, {})
    assert gone == [{"round": 1, "stage": "advertise", "client": "c1", "size": 10}]  # c2's committed row stays
    assert st.get_upload(1, "advertise", "c1") is None and st.get_upload(1, "advertise", "c2").status == "committed"
    with pytest.raises(LookupError, match="not 'advertise'"):
        st.put_chunk(1, "advertise", "c1", 0, b"abcd")
    st.open_upload(1, "share", "c1", 10, "3" * 64, lim)
    assert st.close_round(1, "aborted", "test", None, None) == [{"round": 1, "stage": "share", "client": "c1",
                                                                "size": 10}]
    with pytest.raises(LookupError, match="not open"):
        st.put_chunk(1, "share", "c1", 0, b"abcd")
    st.open_upload(2, "join", "c3", 10, "4" * 64, lim)
    assert st.discard_upload(2, "join", "c3") and st.get_upload(2, "join", "c3") is None
    st.close()
