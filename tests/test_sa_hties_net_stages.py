"""SA-H-TIES as network stages, without sockets: the round engine over a real SQLite store drives the
client stage objects in-process (masking and plain), with a phase-B dropout, a restart between the
phases, and the clients' refusals of bad phase messages."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedproxy_secure.aggregate import AggState, make_aggregator
from fedproxy_secure.auditlog import AuditLog
from fedproxy_secure.client.stages import make_client_stages
from fedproxy_secure.errors import ConfigError, ProtocolAbort
from fedproxy_secure.protocol.names import ROUND_CONFIG_DOMAIN
from fedproxy_secure.protocol.roundcfg import sign_round_config, state_from_bytes
from fedproxy_secure.protocol.sa_hties_wire import (PHASE_DOMAIN, SAHTiesOptions, check_h_message,
                                                    check_phase_b_message, reference_step, round_stages)
from fedproxy_secure.protocol.settings import FederationSettings
from fedproxy_secure.server.rounds import RoundEngine
from fedproxy_secure.server.store import SQLiteStore

DIM = 12


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def raw(pub) -> bytes:
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def updates(n: int, dim: int = DIM, seed: int = 0) -> list[np.ndarray]:
    """Heterogeneous updates (two clusters + noise), L2 norm <= 0.9."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((2, dim))
    out = []
    for i in range(n):
        u = c[i % 2] + 0.8 * rng.standard_normal(dim)
        out.append(u / np.linalg.norm(u) * rng.uniform(0.3, 0.9))
    return out


class Fed:
    """An engine, its store, an operator key and n enrolled clients with known updates."""

    def __init__(self, tmp_path, n=4, rounds=1, **settings) -> None:
        base = {"rounds": rounds, "min_clients": n, "threshold": 2, "mode": "masking", "dim": DIM,
                "aggregator": "sa_hties"}
        base.update(settings)
        self.settings = FederationSettings.from_dict(base)
        self.store, self.audit = SQLiteStore(tmp_path / "state.db"), AuditLog(tmp_path / "audit.jsonl")
        self.op = Ed25519PrivateKey.generate()
        self.clock = Clock()
        self.keys = {}
        for j in range(n):
            k = Ed25519PrivateKey.generate()
            cid, _ = self.store.enroll(self.store.add_token(f"s{j}", 60), raw(k.public_key()))
            self.keys[cid] = k
        self.eng = self.engine()
        self.eng.recover()

    def engine(self) -> RoundEngine:
        return RoundEngine(self.store, self.audit, self.settings, clock=self.clock,
                           signer=lambda cfg, domain=ROUND_CONFIG_DOMAIN: sign_round_config(self.op, cfg, domain))

    def run_round(self, ups: dict[str, np.ndarray], drop: dict[str, str] | None = None,
                  restart_at: str | None = None, edit=None):
        """Join, then every stage; ``drop`` = {client: stage it stays silent from}; returns (rid, cohort, stages)."""
        drop = drop or {}
        rid = self.eng.current().round_id
        for c in self.keys:
            self.eng.submit(c, rid, "join", {"type": "join"})
        cfg = self.store.get_round(rid).config
        cohort = {c: i for c, i in cfg["cohort"]}
        stages = {c: make_client_stages(cfg, ups[c], cohort[c], identity_key=self.keys[c], used_sessions=set(),
                                        operator=self.op.public_key()) for c in self.keys}
        silent: set[str] = set()
        for stage in self.eng.round_stages():
            if self.store.get_round(rid).status != "open":
                break
            for c in sorted(self.keys):
                if drop.get(c) == stage:
                    silent.add(c)
                if c in silent:
                    continue
                st, msg = self.eng.fetch(c, rid, stage)
                if st != "ready":
                    silent.add(c)
                    continue
                if edit:
                    msg = edit(stage, cohort[c], msg)
                try:
                    reply = stages[c].step(stage, msg)
                except ProtocolAbort:
                    silent.add(c)
                    continue
                self.eng.submit(c, rid, stage, json.loads(json.dumps(reply)))
            row = self.store.get_round(rid)
            if row.status == "open" and row.stage == stage:  # someone silent: let the deadline pass
                self.clock.t += 10_000
                self.eng.tick()
            if restart_at == stage:  # server restart: a fresh engine replays every closed stage
                self.eng = self.engine()
                self.eng.recover()
        return rid, cohort, stages


def by_sid(ups: dict[str, np.ndarray], cohort: dict[str, int]) -> dict[int, np.ndarray]:
    return {cohort[c]: u for c, u in ups.items()}


@pytest.mark.parametrize("mode,h_norm,restart_at", [("masking", "reveal", "sa_reveal"),
                                                     ("masking", "none", "unmask"),
                                                     ("plain", "reveal", None)])
def test_round_equals_in_process_sa_hties(tmp_path, mode, h_norm, restart_at):
    fed = Fed(tmp_path, n=4, mode=mode, sa_hties={"h_norm": h_norm})
    ups = dict(zip(sorted(fed.keys), updates(4)))
    rid, cohort, _ = fed.run_round(ups, restart_at=restart_at)
    row = fed.store.get_round(rid)
    assert row.status == "done", row.reason
    state = state_from_bytes(fed.store.global_state()[1])
    ref = make_aggregator("sa_hties", h_norm=h_norm).aggregate([ups[c] for c in sorted(ups)], [1] * 4, AggState())
    np.testing.assert_allclose(state["theta"], ref.delta, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(state["conflict"], ref.conflict, atol=1e-8)
    assert np.linalg.norm(state["theta"]) > 0.05  # a real step, not an empty one
    info = row.result["sa_hties"]
    assert info["K"] == 4 and len(row.result["survivors"]) == 4 and info["h_norm"] == h_norm
    assert (info["h_range"] is None) == (h_norm == "none")
    delta = np.frombuffer(base64.b64decode(row.result["delta_b64"]), "<f8")
    np.testing.assert_array_equal(delta, state["theta"])
    events = [json.loads(x)["event"] for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert ("round_resume" in events) == (restart_at is not None)


def test_phase_b_dropout_keeps_its_phase_a_contribution(tmp_path):
    fed = Fed(tmp_path, n=4)
    ups = dict(zip(sorted(fed.keys), updates(4, seed=3)))
    victim = sorted(fed.keys)[2]
    rid, cohort, _ = fed.run_round(ups, drop={victim: "b_masked_input"})
    row = fed.store.get_round(rid)
    assert row.status == "done", row.reason
    assert victim not in row.result["survivors"] and victim in row.result["sa_hties"]["phase_a_survivors"]
    theta = state_from_bytes(fed.store.global_state()[1])["theta"]
    others = sorted(cohort[c] for c in ups if c != victim)
    ref = reference_step(by_sid(ups, cohort), phase_b=others)
    np.testing.assert_allclose(theta, ref.delta, rtol=1e-6, atol=1e-8)
    # and it differs from a round without the dropout (the victim's u is really absent)
    full = reference_step(by_sid(ups, cohort), phase_b=sorted(cohort.values()))
    assert np.max(np.abs(full.delta - ref.delta)) > 1e-4


def test_reveal_dropout_leaves_phase_b_and_h_range(tmp_path):
    fed = Fed(tmp_path, n=4)
    ups = dict(zip(sorted(fed.keys), updates(4, seed=4)))
    victim = sorted(fed.keys)[0]
    rid, cohort, _ = fed.run_round(ups, drop={victim: "sa_reveal"})
    row = fed.store.get_round(rid)
    assert row.status == "done", row.reason
    rest = sorted(cohort[c] for c in ups if c != victim)
    assert row.result["sa_hties"]["phase_b_cohort_sid"] == rest
    ref = reference_step(by_sid(ups, cohort), phase_b=rest, revealed=rest)
    np.testing.assert_allclose(state_from_bytes(fed.store.global_state()[1])["theta"], ref.delta, rtol=1e-6,
                               atol=1e-8)


def test_below_threshold_in_phase_b_aborts_with_reason(tmp_path):
    fed = Fed(tmp_path, n=3)  # t = 3 for SA-H-TIES: one phase-B dropout is fatal
    ups = dict(zip(sorted(fed.keys), updates(3)))
    rid, _, _ = fed.run_round(ups, drop={sorted(fed.keys)[1]: "b_masked_input"})
    row = fed.store.get_round(rid)
    assert row.status == "aborted"
    assert "only 2 clients alive at stage b_masked_input, threshold 3" in row.reason
    assert fed.store.global_state()[0] == 0  # no update applied


def test_clients_refuse_tampered_phase_messages(tmp_path):
    def forge_t(stage, sid, msg):  # re-sign nothing: just change T
        if stage == "sa_reveal":
            msg = dict(msg, T=base64.b64encode(np.zeros(DIM).tobytes()).decode())
        return msg

    fed = Fed(tmp_path, n=3)
    rid, _, _ = fed.run_round(dict(zip(sorted(fed.keys), updates(3))), edit=forge_t)
    row = fed.store.get_round(rid)
    assert row.status == "aborted" and "sa_reveal" in row.reason  # every client refused: nobody revealed


def _b_msg(opts, **over):
    t = np.full(DIM, 0.5)
    msg = {"type": "sa_phase_b", "round_id": 1, "session_id_a": "aa" * 32, "session_id": "bb" * 32, "K": 4,
           "survivors": [1, 2, 3, 4], "cohort": [1, 2, 4], "threshold": 3,
           "T": base64.b64encode(t.astype("<f8").tobytes()).decode(), "m": max(float(np.linalg.norm(t)) - 1, 0.0),
           "h_range": [0.1, 0.6], "options": opts.model_dump()}
    msg.update(over)
    return msg


def test_check_phase_b_message_refusals():
    opts = SAHTiesOptions()
    kw = dict(round_id=1, session_a=b"\xaa" * 32, session_b=b"\xbb" * 32, sid=2, dim=DIM, cohort_size=4,
              threshold=3, opts=opts, own_h=0.3)
    t, k, cohort, hr = check_phase_b_message(_b_msg(opts), **kw)
    assert k == 4 and cohort == [1, 2, 4] and hr == (0.1, 0.6) and t.shape == (DIM,)
    nan = base64.b64encode(np.r_[np.full(DIM - 1, 0.1), np.nan].astype("<f8").tobytes()).decode()
    short = base64.b64encode(np.zeros(DIM - 1).tobytes()).decode()
    big = base64.b64encode(np.full(DIM, 4.5).tobytes()).decode()
    cases = [
        ({"type": "sa_phase_a"}, "signed sa_phase_b"),
        ({"round_id": 2}, "round 2"),
        ({"session_id": "cc" * 32}, "session ids"),
        ({"T": nan}, "non-finite"),
        ({"T": short}, f"{DIM - 1} values, expected {DIM}"),
        ({"T": big}, "exceeds its bound"),
        ({"m": 0.5}, "shift m"),
        ({"K": 5}, "K = 5"),
        ({"K": 2, "survivors": [1, 2]}, "K = 2"),
        ({"survivors": [1, 2, 2, 4]}, "distinct"),
        ({"cohort": [1, 4]}, "must contain us"),
        ({"cohort": [1, 2, 5]}, "among the phase-A survivors"),
        ({"threshold": 2}, "threshold 2 differs"),
        ({"h_range": [0.4, 0.6]}, "does not contain our own"),
        ({"h_range": [0.6, 0.1]}, "not a (min, max) pair"),
        ({"options": SAHTiesOptions(rho=2.0).model_dump()}, "options differ"),
    ]
    for over, why in cases:
        with pytest.raises(ProtocolAbort, match=None) as ei:
            check_phase_b_message(_b_msg(opts, **over), **kw)
        assert why in str(ei.value), (over, str(ei.value))
    with pytest.raises(ProtocolAbort, match="h_range given although"):
        check_phase_b_message(_b_msg(SAHTiesOptions(h_norm="none")), **dict(kw, opts=SAHTiesOptions(h_norm="none")))


def test_check_h_message_and_stage_names():
    assert check_h_message({"type": "sa_h", "sid": 3, "h": 0.25}, 3) == 0.25
    for msg, why in [({"type": "sa_h", "sid": 2, "h": 0.2}, "claims secagg id"),
                     ({"type": "sa_h", "sid": 3, "h": 1.5}, "in [0, 1]"),
                     ({"type": "sa_h", "sid": 3, "h": True}, "in [0, 1]"),
                     ({"type": "sa_h", "sid": 3, "h": 0.1, "x": 1}, "expects")]:
        with pytest.raises(ProtocolAbort, match=None) as ei:
            check_h_message(msg, 3)
        assert why in str(ei.value)
    assert round_stages(("masked_input",), "reveal") == ("masked_input", "sa_reveal", "b_masked_input")
    assert round_stages(("a", "b"), "none") == ("a", "b", "b_a", "b_b")


def test_client_refuses_unsigned_or_wrong_domain_phase_message_and_reused_session(tmp_path):
    fed = Fed(tmp_path, n=3)
    rid = fed.eng.current().round_id
    for c in fed.keys:
        fed.eng.submit(c, rid, "join", {"type": "join"})
    cfg = fed.store.get_round(rid).config
    c0, sid = cfg["cohort"][0]
    vec = updates(1)[0]
    body = {"type": "sa_phase_a", "round_id": rid}
    for msg in (body, sign_round_config(fed.op, body), sign_round_config(Ed25519PrivateKey.generate(), body,
                                                                          PHASE_DOMAIN)):
        st = make_client_stages(cfg, vec, sid, used_sessions=set(), operator=fed.op.public_key())
        with pytest.raises(ProtocolAbort, match="not signed by the operator"):
            st.step("sa_reveal", msg)
    used = {bytes.fromhex(cfg["sa_hties"]["session_id_b"])}
    with pytest.raises(ProtocolAbort, match="phase-B session id already used"):
        make_client_stages(cfg, vec, sid, used_sessions=used, operator=fed.op.public_key())
    used = set()
    make_client_stages(cfg, vec, sid, used_sessions=used, operator=fed.op.public_key())
    assert used == {bytes.fromhex(cfg["session_id"]), bytes.fromhex(cfg["sa_hties"]["session_id_b"])}
    with pytest.raises(ProtocolAbort, match="operator"):
        make_client_stages(cfg, vec, sid, used_sessions=set())


def test_reference_step_equals_aggregator_and_scales_with_clip_norm():
    ups = updates(5, seed=7)
    for h_norm in ("reveal", "none"):
        ref = reference_step(dict(enumerate(ups, 1)), phase_b=[1, 2, 3, 4, 5], opts=SAHTiesOptions(h_norm=h_norm))
        agg = make_aggregator("sa_hties", h_norm=h_norm).aggregate(ups, [1] * 5, AggState())
        np.testing.assert_allclose(ref.delta, agg.delta, rtol=1e-12, atol=1e-15)
        scaled = reference_step({i: 3 * u for i, u in enumerate(ups, 1)}, phase_b=[1, 2, 3, 4, 5],
                                opts=SAHTiesOptions(h_norm=h_norm), clip_norm=3.0)
        np.testing.assert_allclose(scaled.delta, 3 * agg.delta, rtol=1e-9, atol=1e-14)


def test_settings_refusals_and_fedavg_unchanged():
    base = {"min_clients": 3, "mode": "masking"}
    for extra, why in [({"aggregator": "hties"}, "federation.aggregator='hties'"),
                       ({"aggregator": "sa_hties", "min_clients": 2, "threshold": 2}, "federation.min_clients=2"),
                       ({"aggregator": "sa_hties", "mode": "he"}, "not wired"),
                       ({"aggregator": "sa_hties", "sa_hties": {"rho": 0.5}}, "federation.sa_hties.rho"),
                       ({"aggregator": "sa_hties", "sa_hties": {"h_norm": "hide"}}, "federation.sa_hties.h_norm"),
                       ({"sa_hties": {"h_norm": "none"}}, "aggregator is 'fedavg'")]:
        with pytest.raises(ConfigError) as ei:
            FederationSettings.from_dict({**base, **extra})
        assert why in str(ei.value), str(ei.value)
    s = FederationSettings.from_dict(base)
    assert s.aggregator == "fedavg" and s.sa_hties == {}


def test_audit_check_raises_t_to_three_for_network_sa_hties(tmp_path):
    from fedproxy_secure.audit.check import run_check

    p = tmp_path / "net.yaml"
    p.write_text("clients: 3\nfederation: {mode: masking, min_clients: 3, threshold: 2, aggregator: sa_hties}\n")
    rep = run_check(p)
    f = {x.control: x for x in rep.findings}["secagg.threshold"]
    assert f.status == "PASS" and "t=3" in f.message, f
