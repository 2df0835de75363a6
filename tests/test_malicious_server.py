"""Malicious-server suite: a server that holds the operator key signs downgraded round configs.

The signature checks pass (the double signs with the real operator key the site pinned), so only
the site's own policy (``client/policy.py``) stands between the downgrade and the site's update.
Every test drives the real client path, ``join_federation`` -> ``ClientSession.run_round`` ->
``verified_round_config``, with the HTTPS transport replaced by an in-process server double, and
asserts that the client refuses before its train function is called, before it fetches the global
state, that nothing is posted after ``join``, and that the refusal is in the site's local audit log.
One end-to-end test runs the real server process in mode plain against unmodified client processes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedproxy_secure.client.join as join_mod
from fedproxy_secure.artifacts.keys import generate_key, load_private_key
from fedproxy_secure.auditlog import verify_log
from fedproxy_secure.client.join import join_federation
from fedproxy_secure.client.policy import ClientPolicy, PolicyViolation, check_round_policy
from fedproxy_secure.errors import SecurityError
from fedproxy_secure.server.rounds import FederationSettings, sign_round_config, state_to_bytes
from fedproxy_secure.server.setup import enroll_site, init_server
from fedproxy_secure.transport.http import Reply

DIM = 8
ME = "c-site0"
PEERS = ("c-site1", "c-site2")


class MaliciousServer:
    """Answers the client's API like the real server, but the round config is whatever
    ``tamper`` makes of an honest one, signed with ``signing_key`` (the operator key by default)."""

    def __init__(self, signing_key, tamper=None, after_signing=None) -> None:
        self.key, self.tamper = signing_key, tamper or (lambda c: c)
        self.after_signing = after_signing or (lambda c: c)
        self.requests: list[tuple[str, str]] = []
        self.state = state_to_bytes(np.zeros(DIM))
        self.round_tried = False
        self.identity_pub: bytes | None = None

    def honest_config(self) -> dict:
        ids = {"1": base64.b64encode(self.identity_pub).decode()}
        for i, _ in enumerate(PEERS, start=2):
            ids[str(i)] = base64.b64encode(generate_key().public_key().public_bytes_raw()).decode()
        return {"round_id": 1, "session_id": "ab" * 32, "cohort": [[ME, 1], [PEERS[0], 2], [PEERS[1], 3]],
                "state_round": 0, "state_sha256": hashlib.sha256(self.state).hexdigest(),
                "aggregator": "fedavg", "mode": "masking", "threshold": 2, "dim": DIM, "clip_norm": 1.0,
                "train": {"dp": {"enabled": True, "epsilon": 8.0, "delta": 1e-5}}, "deadlines": {},
                "a_seed": 7, "total_rounds": 3, "issued_at": 1_700_000_000,
                "secagg_options": {"identities": ids, "max_clients": 3}}

    def handle(self, method: str, path: str, body: bytes) -> Reply:
        self.requests.append((method, path))
        if path == "/v1/enroll":
            return Reply(200, json.dumps({"client_id": ME, "name": "site0"}).encode())
        if path == "/v1/federation":
            fed = {"finished": self.round_tried, "round": 1, "status": "open", "stage": "join",
                   "rounds_done": 0, "rounds_total": 3}
            return Reply(200, json.dumps(fed).encode())
        if path == "/v1/round/1/join":
            self.round_tried = True
            return Reply(200, b'{"accepted":true}')
        if path == "/v1/round/1/config":
            cfg = self.after_signing(sign_round_config(self.key, self.tamper(self.honest_config())))
            return Reply(200, json.dumps(cfg).encode())
        if path == "/v1/state/0":
            return Reply(200, self.state)
        if path == "/v1/round/1/report":
            return Reply(200, b'{"accepted":true}')
        return Reply(410, b'{"error":"round over"}')  # any stage: the double ends the round there

    def posted_after_join(self) -> list[str]:
        return [p for m, p in self.requests if m == "POST" and p not in ("/v1/enroll", "/v1/round/1/join")]


class DoubleTransport:
    """Stands in for ``SignedClient``: same interface, routed to a :class:`MaliciousServer`."""

    server: MaliciousServer

    def __init__(self, base_url, ca, cert, key, identity, client_id="enroll", retry_s=120.0, timeout_s=60.0) -> None:
        self.client_id = client_id
        self.server.identity_pub = identity.public_key().public_bytes_raw()

    def close(self) -> None:
        pass

    def request(self, method, path, body=b"", round_id=None, content_type="application/json") -> Reply:
        return self.server.handle(method, path, body)

    def get(self, path, round_id=None) -> Reply:
        return self.request("GET", path)

    def post_json(self, path, obj, round_id=None) -> Reply:
        return self.request("POST", path, json.dumps(obj).encode())


class RecordingTrainer:
    """A train_fn that records every call (the refusals must leave it untouched)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, theta, cfg):
        self.calls.append(int(cfg["round_id"]))
        return np.full(theta.shape[0], 0.01), {"epsilon": 0.5}


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory) -> Path:
    """A real server folder (operator key, CA) and site0's enrolment folder, as ``server init/enroll`` make them."""
    tmp = tmp_path_factory.mktemp("malicious")
    d = tmp / "srv"
    init_server(d, FederationSettings.from_dict({"rounds": 3, "min_clients": 3, "threshold": 2, "dim": DIM}))
    enroll_site(d, "site0", "https://127.0.0.1:1")
    return d


def run_client(server_dir: Path, state: Path, monkeypatch, tamper=None, signing_key=None,
               policy: ClientPolicy | None = None, after_signing=None):
    """Drive the real ``join_federation`` against the double; returns (server, trainer, exception, log lines)."""
    srv = MaliciousServer(signing_key or load_private_key(server_dir / "keys" / "operator.key"), tamper,
                          after_signing)
    DoubleTransport.server = srv
    monkeypatch.setattr(join_mod, "SignedClient", DoubleTransport)
    trainer, lines = RecordingTrainer(), []
    err = None
    try:
        join_federation(server_dir / "enrol" / "site0", state, trainer, log=lines.append, max_wait_s=20,
                        policy=policy)
    except SecurityError as exc:
        err = exc
    return srv, trainer, err, lines


def local_audit(state: Path) -> list[dict]:
    p = state / "audit.jsonl"
    assert verify_log(p).ok, verify_log(p).message(p)
    return [json.loads(x) for x in p.read_text().splitlines()]


def assert_refused_before_training(srv, trainer, err, lines, state, field: str, event: str = "policy_refusal"):
    assert err is not None, "the client accepted a downgraded round config"
    assert trainer.calls == [], "the client trained on a refused config"
    assert ("GET", "/v1/state/0") not in srv.requests, "the client fetched the global state"
    assert srv.posted_after_join() == [], srv.posted_after_join()
    ev = [e for e in local_audit(state) if e["event"] == event]
    assert len(ev) == 1, local_audit(state)
    if event == "policy_refusal":
        assert isinstance(err, PolicyViolation) and err.field == field
        assert ev[0]["data"]["field"] == field and ev[0]["data"]["round"] == 1
    assert any(line.startswith("REFUSED") for line in lines), lines  # shown to the site operator
    return ev[0]["data"]


# ---------------------------------------------------------------- the control: an honest config trains
def test_honest_config_is_accepted_and_trains(server_dir, tmp_path, monkeypatch):
    srv, trainer, err, _ = run_client(server_dir, tmp_path / "st", monkeypatch)
    assert err is None and trainer.calls == [1]
    assert ("GET", "/v1/state/0") in srv.requests and ("POST", "/v1/round/1/report") in srv.requests
    assert not (tmp_path / "st" / "audit.jsonl").exists()


# ---------------------------------------------------------------- one test per downgrade
def test_plain_mode_is_refused(server_dir, tmp_path, monkeypatch):
    out = run_client(server_dir, tmp_path / "st", monkeypatch, tamper=lambda c: {**c, "mode": "plain"})
    rec = assert_refused_before_training(*out, tmp_path / "st", "mode")
    assert rec["server_value"] == "plain" and "masking" in rec["policy_value"]
    assert "mode = 'plain' is refused by this site's policy" in str(out[2])


def test_mode_none_alias_of_plain_is_refused(server_dir, tmp_path, monkeypatch):
    out = run_client(server_dir, tmp_path / "st", monkeypatch, tamper=lambda c: {**c, "mode": "none"})
    assert_refused_before_training(*out, tmp_path / "st", "mode")


def test_low_threshold_is_refused(server_dir, tmp_path, monkeypatch):
    def five_with_t2(c):  # 5 clients, t = 2: two disjoint pairs could each reconstruct
        cohort = c["cohort"] + [["c-site3", 4], ["c-site4", 5]]
        ids = dict(c["secagg_options"]["identities"])
        for i in (4, 5):
            ids[str(i)] = base64.b64encode(generate_key().public_key().public_bytes_raw()).decode()
        return {**c, "cohort": cohort, "threshold": 2, "secagg_options": {**c["secagg_options"], "identities": ids}}

    out = run_client(server_dir, tmp_path / "st", monkeypatch, tamper=five_with_t2)
    rec = assert_refused_before_training(*out, tmp_path / "st", "threshold")
    assert rec["server_value"] == "2 of 5" and "t >= 3" in rec["policy_value"]


def test_threshold_one_is_refused(server_dir, tmp_path, monkeypatch):
    out = run_client(server_dir, tmp_path / "st", monkeypatch, tamper=lambda c: {**c, "threshold": 1})
    assert_refused_before_training(*out, tmp_path / "st", "threshold")


def test_small_cohort_is_refused(server_dir, tmp_path, monkeypatch):
    def two(c):
        return {**c, "cohort": c["cohort"][:2], "threshold": 2}

    out = run_client(server_dir, tmp_path / "st", monkeypatch, tamper=two)
    assert_refused_before_training(*out, tmp_path / "st", "cohort")


def test_no_identities_is_refused(server_dir, tmp_path, monkeypatch):
    def strip(c):
        return {**c, "secagg_options": {k: v for k, v in c["secagg_options"].items() if k != "identities"}}

    out = run_client(server_dir, tmp_path / "st", monkeypatch, tamper=strip)
    assert_refused_before_training(*out, tmp_path / "st", "secagg_options.identities")


def test_substituted_own_identity_is_refused(server_dir, tmp_path, monkeypatch):
    def swap(c):
        ids = {**c["secagg_options"]["identities"],
               "1": base64.b64encode(generate_key().public_key().public_bytes_raw()).decode()}
        return {**c, "secagg_options": {**c["secagg_options"], "identities": ids}}

    out = run_client(server_dir, tmp_path / "st", monkeypatch, tamper=swap)
    assert_refused_before_training(*out, tmp_path / "st", "secagg_options.identities[1]")


def test_he_without_verify_aggregate_is_refused(server_dir, tmp_path, monkeypatch):
    def he_off(c):
        he = {"verify_aggregate": False, "key_holder": 2, "flooding": True}
        return {**c, "mode": "he", "secagg_options": {**c["secagg_options"], "he": he}}

    out = run_client(server_dir, tmp_path / "st", monkeypatch, tamper=he_off)
    rec = assert_refused_before_training(*out, tmp_path / "st", "secagg_options.he.verify_aggregate")
    assert rec["server_value"] is False


def test_sa_hties_h_reveal_is_refused(server_dir, tmp_path, monkeypatch):
    def reveal(c):
        return {**c, "aggregator": "sa_hties", "threshold": 3,
                "sa_hties": {"h_norm": "reveal", "r0": 1.0, "delta": 0.2, "rho": 1.1, "session_id_b": "cd" * 32}}

    out = run_client(server_dir, tmp_path / "st", monkeypatch, tamper=reveal)
    rec = assert_refused_before_training(*out, tmp_path / "st", "sa_hties.h_norm")
    assert rec["server_value"] == "reveal"


def test_sa_hties_h_norm_omitted_counts_as_reveal(server_dir, tmp_path, monkeypatch):
    def omitted(c):
        return {**c, "aggregator": "sa_hties", "threshold": 3, "sa_hties": {"session_id_b": "cd" * 32}}

    out = run_client(server_dir, tmp_path / "st", monkeypatch, tamper=omitted)
    assert_refused_before_training(*out, tmp_path / "st", "sa_hties.h_norm")


def test_replaced_round_config_key_is_refused(server_dir, tmp_path, monkeypatch):
    rogue = generate_key()  # not the pinned operator.pub (a stolen-web-process key, or a rotated-out one)
    out = run_client(server_dir, tmp_path / "st", monkeypatch, signing_key=rogue)
    rec = assert_refused_before_training(*out, tmp_path / "st", "", event="round_config_refusal")
    assert not isinstance(out[2], PolicyViolation) and "unknown key" in rec["reason"]


def test_operator_kid_on_a_rogue_signature_is_refused(server_dir, tmp_path, monkeypatch):
    from fedproxy_secure.artifacts.keys import key_id

    op_kid = key_id(load_private_key(server_dir / "keys" / "operator.key"))
    out = run_client(server_dir, tmp_path / "st", monkeypatch, signing_key=generate_key(),
                     after_signing=lambda signed: {**signed, "kid": op_kid})  # the pinned kid, a rogue signature
    rec = assert_refused_before_training(*out, tmp_path / "st", "", event="round_config_refusal")
    assert "does not verify" in rec["reason"]


def test_too_many_rounds_is_refused(server_dir, tmp_path, monkeypatch):
    out = run_client(server_dir, tmp_path / "st", monkeypatch, tamper=lambda c: {**c, "total_rounds": 10_000})
    rec = assert_refused_before_training(*out, tmp_path / "st", "total_rounds")
    assert rec["server_value"] == 10_000 and "max_rounds = 100" in rec["policy_value"]


def test_epsilon_over_the_cap_is_refused(server_dir, tmp_path, monkeypatch):
    def eps(c):
        return {**c, "train": {"dp": {"enabled": True, "epsilon": 50.0, "delta": 1e-5}}}

    out = run_client(server_dir, tmp_path / "st", monkeypatch, tamper=eps)
    rec = assert_refused_before_training(*out, tmp_path / "st", "train.dp.epsilon")
    assert rec["server_value"] == 50.0


def test_a_relaxed_site_policy_accepts_what_it_lists(server_dir, tmp_path, monkeypatch):
    """The policy is the site's: listing plain explicitly lets a test federation run in the clear."""
    pol = ClientPolicy(modes=frozenset({"plain", "masking"}))
    srv, trainer, err, _ = run_client(server_dir, tmp_path / "st", monkeypatch, policy=pol,
                                      tamper=lambda c: {**c, "mode": "plain"})
    assert err is None and trainer.calls == [1]


# ---------------------------------------------------------------- the pure check and the config file
def test_check_round_policy_names_field_server_value_and_policy_value():
    cfg = {"round_id": 4, "mode": "masking", "cohort": [["a", 1], ["b", 2], ["c", 3], ["d", 4]], "threshold": 2,
           "total_rounds": 5, "secagg_options": {"identities": {str(i): base64.b64encode(bytes(32)).decode()
                                                                for i in range(1, 5)}}}
    with pytest.raises(PolicyViolation) as ei:
        check_round_policy(ClientPolicy(), cfg)
    e = ei.value
    assert (e.field, e.server_value, e.round_id) == ("threshold", "2 of 4", 4)
    assert "min_threshold_fraction = 0.5" in e.policy_value and "round 4: round config threshold" in str(e)
    check_round_policy(ClientPolicy(), {**cfg, "threshold": 3})  # the honest server's n // 2 + 1 passes


def test_client_yaml_policy_is_validated_with_the_field_named(tmp_path):
    from fedproxy_secure.client.join_config import load_join_config
    from fedproxy_secure.errors import ConfigError

    (tmp_path / "enrol").mkdir()
    (tmp_path / "enrol" / "server.json").write_text("{}")
    y = tmp_path / "client.yaml"
    y.write_text("enrolment: enrol\ntrainer: synthetic\npolicy: {modes: [masking, cleartext]}\n")
    with pytest.raises(ConfigError, match="policy.modes"):
        load_join_config(y)
    y.write_text("enrolment: enrol\ntrainer: synthetic\npolicy: {min_threshold_fraction: 1.5}\n")
    with pytest.raises(ConfigError, match="policy.min_threshold_fraction"):
        load_join_config(y)
    y.write_text("enrolment: enrol\ntrainer: synthetic\ndp: {enabled: true, epsilon: 20}\n")
    with pytest.raises(ConfigError, match="policy.max_epsilon"):
        load_join_config(y)
    y.write_text("enrolment: enrol\ntrainer: synthetic\npolicy: {modes: [he], allow_h_reveal: true, require_dp: false}\n")
    cfg = load_join_config(y)
    assert cfg.policy.modes == frozenset({"he"}) and cfg.policy.allow_h_reveal
    assert cfg.policy.require_identities is True


# ---------------------------------------------------------------- end to end: the real server, plain mode
def test_real_server_in_plain_mode_is_refused_by_unmodified_clients(tmp_path):
    """The real server process signs its own plain-mode config with the real operator key; client
    processes with the default policy exit 3, print the refusal, audit it and never send an update."""
    from tests.net_helpers import db_rounds, make_server, start_client, start_server, stop

    d, port = make_server(tmp_path, 3, mode="plain", min_clients=3, rounds=1)
    srv = start_server(d, port)
    try:
        clients = [start_client(d, i, tmp_path, extra=["--max-wait", "60"]) for i in range(3)]
        for c in clients:
            c.wait(60)
        assert [c.returncode for c in clients] == [3, 3, 3]
    finally:
        stop(srv)
    for i in range(3):
        log = (tmp_path / f"client{i}.log").read_text()
        assert "refused: round 1: round config mode = 'plain' is refused by this site's policy" in log, log
        ev = local_audit(tmp_path / f"client{i}")
        assert [e["event"] for e in ev] == ["policy_refusal"] and ev[0]["data"]["field"] == "mode"
    assert not (tmp_path / "client0.json").exists()  # no summary: the client stopped
    rounds = db_rounds(d)
    assert all(r[1] != "done" for r in rounds), rounds  # no plaintext sum was ever formed
    con_rows = subprocess.run([sys.executable, "-c", (
        "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]);"
        "print(c.execute(\"SELECT COUNT(*) FROM submissions WHERE stage='masked_input'\").fetchone()[0])"),
        str(d / "state.db")], capture_output=True, text=True)
    assert con_rows.stdout.strip() == "0", con_rows.stdout + con_rows.stderr
