"""The real server's report and status routes (issue 20): a client report holds only the minimal keys
(anything else is refused with a 4xx naming the field, and nothing is stored or audited), and
``GET /v1/status`` shows a site only its own rows, never another site's name, id, dropout or ε.
Exercised over loopback TLS against the server process (``tests/net_helpers.py``)."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import pytest

from fedproxy_secure.client.join import ClientSession
from fedproxy_secure.client.report import SENT_REPORT_KEYS, public_report
from fedproxy_secure.server.store import CLIENT_REPORT_KEYS
from fedproxy_secure.transport.signing import sign_request
from fedproxy_secure.transport.tls import client_ssl_context
from tests.net_helpers import make_server, start_server, stop


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit_net")
    d, port = make_server(tmp, 2, min_clients=3)
    srv = start_server(d, port)
    sessions = [ClientSession(d / "enrol" / f"site{i}", tmp / f"c{i}", retry_s=5) for i in range(2)]
    for s in sessions:
        s.enroll()
    yield d, port, sessions
    for s in sessions:
        s.close()
    stop(srv)


def _client(d, i: int) -> httpx.Client:
    e = d / "enrol" / f"site{i}"
    return httpx.Client(verify=client_ssl_context(e / "ca.pem", e / "client.pem", e / "client.key"), timeout=10)


def _post_report(d, port, s, i: int, rid: int, report: dict) -> httpx.Response:
    body = json.dumps(report).encode()
    path = f"/v1/round/{rid}/report"
    h = sign_request(s.key, s.client_id, "POST", path, body, round_id=rid)
    with _client(d, i) as c:
        return c.post(f"https://127.0.0.1:{port}{path}", content=body,
                      headers={**h, "content-type": "application/json"})


def _status(d, port, s, i: int) -> dict:
    h = sign_request(s.key, s.client_id, "GET", "/v1/status", b"")
    with _client(d, i) as c:
        r = c.get(f"https://127.0.0.1:{port}/v1/status", headers=h)
    assert r.status_code == 200, r.text
    return r.json()


def _stored(d) -> list[dict]:
    con = sqlite3.connect(f"file:{d / 'state.db'}?mode=ro", uri=True)
    try:
        return [json.loads(r[0]) for r in con.execute("SELECT report FROM client_reports")]
    finally:
        con.close()


def test_server_accepts_exactly_the_keys_the_client_sends() -> None:
    assert set(CLIENT_REPORT_KEYS) == set(SENT_REPORT_KEYS)


@pytest.mark.parametrize("extra", ["train_loss", "pre_clip_norm", "post_clip_norm", "num_examples", "sample_rate",
                                   "seconds"])
def test_report_with_a_training_statistic_is_refused_naming_the_field(fed, extra) -> None:
    d, port, (s0, _) = fed
    before = _stored(d)
    r = _post_report(d, port, s0, 0, 7, {"round_id": 7, "epsilon": 1.0, "status": "trained", extra: 0.5})
    assert 400 <= r.status_code < 500 and r.status_code == 422, r.text
    assert extra in r.json()["error"] and "round_id" in r.json()["error"]
    assert _stored(d) == before  # nothing of it was stored
    log = (d / "audit.jsonl").read_text()
    assert f'"{extra}": 0.5' not in log  # nor copied into the audit log (the refusal names only the field)


def test_report_with_bad_values_is_refused(fed) -> None:
    d, port, (s0, _) = fed
    for bad, field in [({"epsilon": "lots"}, "epsilon"), ({"round_id": 8}, "round_id"), ({"delta": -1.0}, "delta"),
                       ({"status": "x" * 40}, "status")]:
        r = _post_report(d, port, s0, 0, 7, {"status": "trained", **bad})
        assert r.status_code == 422 and field in r.json()["error"], (bad, r.text)


def test_minimal_report_is_accepted_and_stored_as_sent(fed) -> None:
    d, port, (s0, _) = fed
    sent = public_report({"epsilon": 0.75, "delta": 1e-5, "accountant": "rdp", "train_loss": 2.0}, round_id=3)
    assert "train_loss" not in sent
    r = _post_report(d, port, s0, 0, 3, sent)
    assert r.status_code == 200, r.text
    assert sent in _stored(d)


def test_status_shows_a_site_only_its_own_rows(fed) -> None:
    d, port, (s0, s1) = fed
    assert _post_report(d, port, s0, 0, 1, {"round_id": 1, "epsilon": 1.25, "status": "trained"}).status_code == 200
    assert _post_report(d, port, s1, 1, 1, {"round_id": 1, "epsilon": 9.5, "status": "trained"}).status_code == 200
    con = sqlite3.connect(d / "state.db", timeout=10)
    with con:  # round 1 (opened by the server, waiting for joins): site1 and a third site recorded as dropped
        assert con.execute("SELECT COUNT(*) FROM rounds WHERE round_id=1").fetchone()[0] == 1
        con.execute("INSERT INTO transitions(round_id,stage,ts,data) VALUES(1,'join',?,?)",
                    (time.time(), json.dumps({"dropped": [s1.client_id, "c-third"], "note": "test"})))
    con.close()
    st0, st1 = _status(d, port, s0, 0), _status(d, port, s1, 1)
    text0 = json.dumps(st0)
    for other in (s1.client_id, "site1", "c-third", "9.5"):
        assert other not in text0, (other, st0)
    assert "clients" not in st0
    r0 = next(r for r in st0["rounds"] if r["round"] == 1)
    assert r0["epsilon"] == 1.25 and r0["dropped"] is False
    assert st0["client"]["client_id"] == s0.client_id and st0["client"]["name"] == "site0"
    r1 = next(r for r in st1["rounds"] if r["round"] == 1)
    assert r1["epsilon"] == 9.5 and r1["dropped"] is True
    text1 = json.dumps(st1)
    assert s0.client_id not in text1 and "site0" not in text1 and "1.25" not in text1
