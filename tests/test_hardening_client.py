"""Hardening of the joining client (issues 17 and 20).

* A server that is down: every request *and* the proxy-bundle download go through the retry wrapper
  and end in one ``ServerUnreachable`` line naming the server URL (no httpx traceback).
* The report that leaves a site is minimal (round id, ε, δ, accountant, status); the full report
  (loss on the private batches, update norms, example count, sample rate, timings) stays in the
  site's state folder. Checked on the bytes the client posts and on what the server stores.
"""

from __future__ import annotations

import json
import re
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import yaml

from fedproxy_secure.artifacts import create_keyset, generate_key, save_keyset
from fedproxy_secure.client.join import ClientSession, join_federation
from fedproxy_secure.client.net_lora import load_bundle_from_server
from fedproxy_secure.client.report import SENT_REPORT_KEYS, local_report_path, public_report, read_local_reports
from fedproxy_secure.transport.http import ServerUnreachable, SignedClient, retry_transport
from tests.net_helpers import ROOT, env, make_server, start_server, stop

#: what a trainer measures that must never leave the site
REMOVED = ("train_loss", "pre_clip_norm", "post_clip_norm", "num_examples", "sample_rate", "seconds",
           "seconds_per_step", "noise_multiplier", "steps", "truncated", "epsilon_scope", "max_grad_norm")


# ------------------------------------------------------------------ server down: one line naming the URL
def test_retry_wrapper_retries_transport_errors_then_names_the_url():
    calls = []

    def down():
        calls.append(time.monotonic())
        raise httpx.ConnectError("[Errno 111] Connection refused")

    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable) as err:
        retry_transport(down, "https://fed.example:8443", 1.0, "GET /v1/federation")
    assert 0.5 < time.monotonic() - t0 < 3.0 and len(calls) >= 3  # retried with backoff, then gave up
    msg = str(err.value)
    assert msg.startswith("GET /v1/federation: cannot reach the federation server at https://fed.example:8443 "
                          "after 1 s (ConnectError: [Errno 111] Connection refused)") and "\n" not in msg

    def refused():  # not a transport error: never retried
        calls.append(0)
        raise ValueError("bad reply")

    calls.clear()
    with pytest.raises(ValueError):
        retry_transport(refused, "https://x", 5.0)
    assert calls == [0]


@pytest.fixture()
def down_server(tmp_path):
    """An enrolled site whose server is not running (its port is closed)."""
    d, port = make_server(tmp_path, 1)
    enrol, state = d / "enrol" / "site0", tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "enrolment.json").write_text(json.dumps({"client_id": "c-site0", "name": "site0"}))
    ks = tmp_path / "keyset.json"
    save_keyset(create_keyset(generate_key(), name="t"), ks)
    return enrol, state, ks, f"https://127.0.0.1:{port}"


def test_bundle_download_from_a_down_server_goes_through_the_retry_wrapper(down_server):
    enrol, state, ks, url = down_server
    s = ClientSession(enrol, state, retry_s=1)
    try:
        assert s.client_id == "c-site0"  # enrolled: the first request is the bundle download
        t0 = time.monotonic()
        with pytest.raises(ServerUnreachable) as err:
            load_bundle_from_server(s, ks, state)
        assert time.monotonic() - t0 < 10
    finally:
        s.close()
    assert str(err.value).startswith(f"proxy bundle download /v1/bundle/MANIFEST.sig: cannot reach the federation "
                                     f"server at {url} after 1 s (ConnectError")
    assert not list(state.glob("bundle-dl-*"))  # the private download folder is removed


def test_enrolment_against_a_down_server_is_one_line(down_server):
    enrol, state, _, url = down_server
    (state / "enrolment.json").unlink()
    s = ClientSession(enrol, state, retry_s=1)
    try:
        with pytest.raises(ServerUnreachable, match=re.escape(f"POST /v1/enroll: cannot reach the federation server "
                                                              f"at {url}")):
            s.enroll()
    finally:
        s.close()


def test_client_join_cli_with_the_server_down_exits_1_with_one_line(down_server, tmp_path):
    """The command a site runs: one error line naming the URL, exit 1, no traceback (synthetic trainer and
    a fresh enrolment keep torch out of it; the bundle path is the test above)."""
    enrol, state, _, url = down_server
    (state / "enrolment.json").unlink()
    cfg = tmp_path / "client.yaml"
    cfg.write_text(yaml.safe_dump({"enrolment": str(enrol), "state_dir": str(state), "trainer": "synthetic",
                                   "server_retry_s": 1, "policy": {"require_dp": False}}))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "fedproxy_secure.cli.main", "client", "join", "--config", str(cfg)],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    err = " ".join(r.stderr.split())
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "httpx" not in r.stderr, r.stderr[-3000:]
    assert f"error: POST /v1/enroll: cannot reach the federation server at {url} after 1 s" in err, err
    assert time.monotonic() - t0 < 60


# ------------------------------------------------------------------ the minimal report
def test_public_report_keeps_only_round_accounting_and_status():
    full = {"round_id": 3, "epsilon": np.float64(2.5), "delta": 1e-5, "accountant": "prv", "train_loss": 1.25,
            "pre_clip_norm": 4.0, "post_clip_norm": 1.0, "num_examples": 96, "sample_rate": 0.1, "seconds": 2.0,
            "seconds_per_step": 0.2, "noise_multiplier": 1.1, "steps": 10, "dp": True}
    sent = public_report(full, 3)
    assert sent == {"round_id": 3, "epsilon": 2.5, "delta": 1e-5, "accountant": "prv", "status": "trained"}
    assert set(sent) <= set(SENT_REPORT_KEYS)
    assert public_report({"examples": 1, "epsilon": None}, 2) == {"round_id": 2, "status": "trained"}


def _rich_train_fn(seed: int):
    """A trainer whose report carries every statistic a real one measures (values unique per site)."""
    def fn(theta, cfg):
        rid = int(cfg["round_id"])
        rng = np.random.default_rng([seed, rid])
        return 0.1 * rng.standard_normal(theta.shape[0]), {
            "round_id": rid, "epsilon": 1.5 + seed, "delta": 1e-5, "accountant": "prv",
            "epsilon_scope": "total spent by this client so far", "noise_multiplier": 1.07, "sample_rate": 0.125,
            "max_grad_norm": 1.0, "num_examples": 40 + seed, "steps": 5, "train_loss": 2.718281 + seed,
            "pre_clip_norm": 3.14159, "post_clip_norm": 1.0, "seconds": 1.5, "seconds_per_step": 0.3,
            "truncated": 0}
    return fn


def test_the_bytes_a_client_posts_hold_no_training_statistic(tmp_path, monkeypatch):
    d, port = make_server(tmp_path, 3, rounds=1)
    posted: list[tuple[str, str, bytes]] = []
    original = SignedClient.request

    def recording(self, method, path, body=b"", round_id=None, content_type="application/json"):
        posted.append((method, path, bytes(body)))
        return original(self, method, path, body, round_id, content_type=content_type) if round_id is not None \
            else original(self, method, path, body, content_type=content_type)

    monkeypatch.setattr(SignedClient, "request", recording)
    srv = start_server(d, port)
    results, errors = {}, []

    def site(i: int) -> None:
        try:
            results[i] = join_federation(d / "enrol" / f"site{i}", tmp_path / f"c{i}", _rich_train_fn(i),
                                         max_wait_s=90, retry_s=10)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    try:
        threads = [threading.Thread(target=site, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        stop(srv)
    assert not errors, errors
    assert all(results[i].rounds_done == [1] for i in range(3)), results

    reports = [(p, b) for m, p, b in posted if m == "POST" and re.fullmatch(r"/v1/round/\d+/report", p)]
    assert len(reports) == 3
    for _, body in reports:
        for name in REMOVED:
            assert name.encode() not in body, (name, body)
        assert b"2.718281" not in body and b"3.14159" not in body
        assert set(json.loads(body)) == {"round_id", "epsilon", "delta", "accountant", "status"}
    assert sorted(json.loads(b)["epsilon"] for _, b in reports) == [1.5, 2.5, 3.5]

    # what the server stored and audited is exactly what was posted
    con = sqlite3.connect(f"file:{d / 'state.db'}?mode=ro", uri=True)
    try:
        stored = [json.loads(r[0]) for r in con.execute("SELECT report FROM client_reports")]
    finally:
        con.close()
    assert len(stored) == 3 and all(set(x) == set(SENT_REPORT_KEYS) for x in stored)
    audit = (d / "audit.jsonl").read_text()
    for name in ("train_loss", "pre_clip_norm", "post_clip_norm", "num_examples", "sample_rate", "noise_multiplier"):
        assert name not in audit, name

    # the full report stays on the site, 0600, next to what was sent
    for i in range(3):
        path = local_report_path(tmp_path / f"c{i}", 1)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        rec = read_local_reports(tmp_path / f"c{i}")[1]
        assert rec["report"]["train_loss"] == pytest.approx(2.718281 + i)
        assert rec["report"]["num_examples"] == 40 + i and rec["report"]["pre_clip_norm"] == pytest.approx(3.14159)
        assert rec["sent_to_server"] == {"round_id": 1, "epsilon": 1.5 + i, "delta": 1e-5, "accountant": "prv",
                                         "status": "trained"}
        assert results[i].reports[0]["train_loss"] == pytest.approx(2.718281 + i)  # the site operator's view
