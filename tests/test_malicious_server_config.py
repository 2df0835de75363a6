"""Malicious-server suite, part two (issue 26): a server that holds every key still cannot single out a site.

The server here signs with the real operator key, relays messages as it likes and enrols members it
controls. Each test plays one attack against the real client code and asserts the refusal; each
protection was checked by replacing it with ``pass`` (the test then fails), see SECURITY.md's
guarantees table.

* one config per round: configs that differ between sites make the sites abort before any masked or
  encrypted input leaves (masking, HE, SA-H-TIES phase B);
* a SecAgg+ graph the server cannot grind (session id, a colluder's re-drawn nonce, a dropped member);
* policy bounds and federation pins (clip norm, lr, degree, precision, a_seed / dim / LoRA across a restart);
* a cohort roster (unrostered members, HE without a roster, a key holder out of turn or not rostered);
* DP a site can require; SA-H-TIES' T bound; the site's evidence and the auditor's equivocation check.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fedproxy_secure.artifacts.keys import generate_key, load_private_key
from fedproxy_secure.client.join import clip_update
from fedproxy_secure.client.policy import ClientPolicy, PolicyViolation, check_round_policy
from fedproxy_secure.errors import ProtocolAbort, SecurityError
from fedproxy_secure.wire.binding import graph_commit, graph_seed
from fedproxy_secure.protocol.modes import make_client_stages
from fedproxy_secure.protocol.modes.masking import MaskingServerStages
from fedproxy_secure.protocol.roster import identity_fingerprint
from fedproxy_secure.protocol.roundcfg import sign_round_config, verify_round_config
from fedproxy_secure.secagg import messages as M
from fedproxy_secure.secagg.masking import ClientProtocol, MaskingConfig
from fedproxy_secure.secagg.encoding import FixedPointEncoder
from tests.test_malicious_server import (PEERS, assert_refused_before_training, run_client,  # noqa: F401
                                         server_dir)

DIM = 8
OP = generate_key()  # the operator key: the malicious server holds it and signs whatever it likes
SESSION = bytes(range(32))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def pub(key) -> bytes:
    return key.public_key().public_bytes_raw()


class Cohort:
    """n sites with identity keys and fresh graph nonces; ``config`` builds a round config for them."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.n = n
        self.keys = {i: generate_key() for i in range(1, n + 1)}
        self.nonces = {i: rng.bytes(32) for i in range(1, n + 1)}

    def config(self, **over) -> dict:
        ids = {str(i): b64(pub(k)) for i, k in self.keys.items()}
        commits = {str(i): graph_commit(nc).hex() for i, nc in self.nonces.items()}
        cfg = {"round_id": 1, "session_id": SESSION.hex(), "cohort": [[f"c-{i:02d}", i] for i in self.keys],
               "state_round": 0, "state_sha256": "00" * 32, "aggregator": "fedavg", "mode": "masking",
               "threshold": self.n // 2 + 1, "dim": DIM, "clip_norm": 1.0, "train": {"lr": 1e-3}, "deadlines": {},
               "a_seed": 7, "total_rounds": 3, "issued_at": 1_700_000_000,
               "secagg_options": {"identities": ids, "max_clients": self.n, "graph_commits": commits}}
        for k, v in over.items():
            cfg[k] = {**cfg[k], **v} if isinstance(cfg.get(k), dict) and isinstance(v, dict) else v
        return cfg

    def stages(self, sid: int, signed: dict, vector: np.ndarray):
        """The site's real client stages for a config it verified under the pinned operator key."""
        cfg = verify_round_config(OP.public_key(), signed)
        return make_client_stages(cfg, vector, sid, identity_key=self.keys[sid], graph_nonce=self.nonces[sid],
                                  operator=OP.public_key())


def relay(cohort: Cohort, dim: int, threshold: int, session: bytes = SESSION) -> MaskingServerStages:
    """The malicious server's relay: it checks no signature (no identities) and forwards everything."""
    return MaskingServerStages(cohort=list(cohort.keys), dim=dim, threshold=threshold, session_id=session,
                               clip_norm=1.0, options={"max_clients": cohort.n})


# ====================================================================== 1. one config per round
def test_masking_sites_given_different_configs_abort_before_any_masked_input_leaves():
    """The attack of the issue: every site but the target gets clip_norm 1e-12 (its update encodes to 0),
    so the "sum" the server unmasks is the target's update. The target signs the digest of *its*
    config into its keys and checks its peers' against it: it aborts at the key broadcast."""
    co = Cohort(3)
    target_cfg = sign_round_config(OP, co.config())
    other_cfg = sign_round_config(OP, co.config(clip_norm=1e-12))
    rng = np.random.default_rng(1)
    x = {i: clip_update(rng.standard_normal(DIM), 1.0 if i == 1 else 1e-12) for i in co.keys}
    st = {i: co.stages(i, target_cfg if i == 1 else other_cfg, x[i]) for i in co.keys}
    srv = relay(co, DIM, 2)
    out = srv.close("advertise", {i: st[i].step("advertise", {}) for i in co.keys})
    sent_masked: set[int] = set()
    aborted: dict[int, str] = {}
    for stage in ("share", "masked_input", "consistency", "unmask"):
        replies = {}
        for i, msg in sorted(out.items()):
            try:
                replies[i] = st[i].step(stage, msg)
            except ProtocolAbort as exc:
                aborted[i] = str(exc)
                continue
            if stage == "masked_input":
                sent_masked.add(i)
        if not replies:
            break
        out = srv.close(stage, replies) or {}
    assert 1 not in sent_masked, "the target sent its masked input under a config its peers did not get"
    assert "another round config" in aborted[1], aborted
    assert set(aborted) == {1, 2, 3}  # the peers also refuse the target's keys


def test_he_site_given_another_config_than_the_key_holder_refuses_the_descriptor():
    """HE: the key holder signs its descriptor over its config's digest; a site sent another config
    (here clip_norm 1e-12, to make the "sum" the key holder decrypts its own update) refuses it
    before it encrypts anything."""
    pytest.importorskip("tenseal")
    from fedproxy_secure.protocol.he_wire import he_settings

    co = Cohort(3)
    he = {**he_settings({}, 1.0), "key_holder": 1, "statement_key": b64(pub(generate_key()))}
    base = co.config(mode="he", threshold=2, secagg_options={"he": he})
    signed_kh = sign_round_config(OP, base)
    signed_other = sign_round_config(OP, {**base, "clip_norm": 1e-12})
    kh = co.stages(1, signed_kh, np.full(DIM, 0.1))
    other = co.stages(2, signed_other, np.full(DIM, 1e-13))
    keys = kh.step("he_keys", {})
    ctx = {"type": "he_context", "key_holder": 1, "descriptor": keys["descriptor"], "signature": keys["signature"]}
    with pytest.raises(SecurityError, match="another round config"):
        other.step("he_input", ctx)  # nothing was encrypted under it
    assert other.envelope_sha256 is None


def test_he_key_holder_refuses_a_contribution_signed_over_another_config():
    pytest.importorskip("tenseal")
    from fedproxy_secure.protocol.he_wire import he_settings
    from fedproxy_secure.protocol.modes.he import HEServerStages

    co = Cohort(3)
    st_key = generate_key()
    he = {**he_settings({}, 1.0), "key_holder": 1, "statement_key": b64(pub(st_key))}
    base = co.config(mode="he", threshold=2, secagg_options={"he": he})
    signed = sign_round_config(OP, base)
    odd = sign_round_config(OP, {**base, "train": {"lr": 0.5}})
    st = {1: co.stages(1, signed, np.full(DIM, 0.1)), 2: co.stages(2, signed, np.full(DIM, 0.1)),
          3: co.stages(3, odd, np.full(DIM, 0.1))}
    # a server that checks nothing against the config: it builds its stages over the key holder's config
    from fedproxy_secure.wire.binding import round_config_digest

    srv = HEServerStages(cohort=[1, 2, 3], dim=DIM, threshold=2, session_id=SESSION, clip_norm=1.0,
                         options=base["secagg_options"], signing_key=st_key,
                         context=round_config_digest(verify_round_config(OP.public_key(), signed)))
    out = srv.close("he_keys", {i: st[i].step("he_keys", {}) for i in st})
    inputs = {}
    for i in st:
        try:
            inputs[i] = st[i].step("he_input", out[i])
        except SecurityError:
            pass
    assert 3 not in inputs  # site 3 refused the key holder's descriptor (signed over another config)
    # the server smuggles site 3's earlier-signed envelope in anyway: make one signed over site 3's config
    from fedproxy_secure.artifacts.keys import sign
    from fedproxy_secure.wire.codec import b64e
    from fedproxy_secure.protocol.he_wire import INPUT_DOMAIN, signed_payload
    from fedproxy_secure.secagg.he import ClientEncryptor

    desc = base64.b64decode(out[1]["descriptor"])
    env = ClientEncryptor(desc, clip=1.0).encrypt(np.full(DIM, 0.1), session_id=SESSION, client_id=3)
    ctx3 = round_config_digest(verify_round_config(OP.public_key(), odd))
    msg3 = {"type": "he_input", "sid": 3, "envelope": b64e(env),
            "signature": b64e(sign(co.keys[3], INPUT_DOMAIN, signed_payload(SESSION, 3, env, ctx3)))}
    # the server's own check would refuse it; the malicious server forwards it with a forged statement
    agg_msg = _forged_aggregate(srv, st_key, {**inputs, 3: msg3})
    with pytest.raises(SecurityError, match="did not sign"):
        st[1].step("he_decrypt", agg_msg)


def _forged_aggregate(srv, st_key, inputs: dict) -> dict:
    """The he_aggregate a malicious server sends: its own statement over every envelope, no checks."""
    from fedproxy_secure.wire.codec import b64e
    from fedproxy_secure.secagg.he import ServerAggregatorHE

    desc = base64.b64decode(srv._context_msg["descriptor"])
    agg = ServerAggregatorHE(desc, signing_key=st_key)
    agg.start_round(SESSION, DIM)
    for i in sorted(inputs):
        agg.submit(i, base64.b64decode(inputs[i]["envelope"]))
    blob, statement, sig = agg.finish(2)
    contribs = {str(i): {"signature": m["signature"], "envelope": m["envelope"]} for i, m in inputs.items()}
    return {"type": "he_aggregate", "aggregate": b64e(blob), "statement": b64e(statement),
            "statement_signature": b64e(sig), "contributions": contribs}


def test_sa_hties_phase_b_with_a_different_t_per_site_aborts_before_the_phase_b_input():
    """Phase B binds the signed phase-B message (T, K, cohort, h_range, options): a site sent another T
    than its peers aborts at the phase-B key broadcast, before its phase-B vector leaves."""
    from fedproxy_secure.aggregate.sa_hties import PHASE_B_PARTS
    from fedproxy_secure.protocol.names import SA_PHASE_DOMAIN
    from fedproxy_secure.protocol.sa_hties_wire import phase_b_message, sa_options

    co = Cohort(3)
    session_b = bytes(range(32, 64))
    opts = sa_options({"h_norm": "none"})
    cfg = co.config(aggregator="sa_hties", threshold=3,
                    sa_hties={**opts.model_dump(), "session_id_b": session_b.hex()})
    signed = sign_round_config(OP, cfg)
    rng = np.random.default_rng(3)
    x = {i: clip_update(rng.standard_normal(DIM), 1.0) for i in co.keys}
    st = {i: co.stages(i, signed, x[i]) for i in co.keys}
    unit = {i: x[i] / np.linalg.norm(x[i]) for i in co.keys}
    t_true = sum(unit.values())
    t_fake = unit[1] + unit[2] - unit[3]  # what the server tells site 1 alone
    msgs = {i: sign_round_config(OP, phase_b_message(1, SESSION, session_b, [1, 2, 3], [1, 2, 3], 3,
                                                     t_fake if i == 1 else t_true, opts, None), SA_PHASE_DOMAIN)
            for i in co.keys}
    adv = {i: st[i].step("b_advertise", msgs[i]) for i in co.keys}
    srv = relay(co, PHASE_B_PARTS * DIM, 3, session_b)
    out = srv.close("advertise", adv)
    with pytest.raises(ProtocolAbort, match="another round config"):
        st[1].step("b_share", out[1])
    for i in (2, 3):
        with pytest.raises(ProtocolAbort, match="another round config"):
            st[i].step("b_share", out[i])


# ====================================================================== 2. the SecAgg+ graph
N_GRAPH, DEGREE, COLLUDERS, TARGET = 20, 4, (18, 19, 20), 1


def _graph_round(co: Cohort, session: bytes, reveal: dict[int, bytes] | None = None,
                 drop: tuple[int, ...] = ()) -> ClientProtocol:
    """Run the masking protocol up to the key broadcast with the real ClientProtocol; returns the target's.

    ``reveal`` overrides what a (colluding) site reveals; ``drop``: members the server leaves out of U1."""
    cfg = MaskingConfig(threshold=N_GRAPH // 2 + 1, vector_length=DIM, encoder=FixedPointEncoder(max_clients=64),
                        neighbours=DEGREE)
    commits = {i: graph_commit(nc) for i, nc in co.nonces.items()}
    peers = {i: k.public_key() for i, k in co.keys.items()}
    protos = {i: ClientProtocol(i, session, cfg, np.zeros(DIM), identity_key=co.keys[i], peer_identities=peers,
                                graph_commits=commits, graph_nonce=(reveal or {}).get(i, co.nonces[i]))
              for i in co.keys}
    keys = tuple(protos[i].advertise().keys for i in sorted(protos) if i not in drop)
    protos[TARGET].handle(M.KeyBroadcast(session, TARGET, keys))
    return protos[TARGET]


def _colluders_hold_majority(p: ClientProtocol) -> bool:
    return len(p.neighbours & set(COLLUDERS)) >= p.holders_threshold


def _legacy_graph(session: bytes) -> frozenset:
    """What the graph was before: keyed by the server-drawn session id alone."""
    return MaskingConfig(threshold=11, vector_length=DIM, neighbours=DEGREE).neighbours_of(
        session, range(1, N_GRAPH + 1), TARGET)


def test_server_grinding_the_session_id_does_not_choose_the_targets_neighbours():
    co = Cohort(N_GRAPH, seed=5)
    session = next(s for s in (hashlib.sha256(b"grind" + j.to_bytes(4, "big")).digest() for j in range(200_000))
                   if set(COLLUDERS) <= _legacy_graph(s))  # a session id the server picked for its colluders
    target = _graph_round(co, session)
    assert target.graph_sparse and not _colluders_hold_majority(target), sorted(target.neighbours)


def test_colluder_revealing_another_nonce_gets_the_complete_graph_not_its_choice():
    """A colluder sees the honest nonces, then grinds its own reveal: it no longer opens its commitment,
    so every party falls back to the complete graph (t-of-n shares), never to the ground graph."""
    co = Cohort(N_GRAPH, seed=6)
    ids = list(range(1, N_GRAPH + 1))
    cfg = MaskingConfig(threshold=11, vector_length=DIM, neighbours=DEGREE)
    for j in range(200_000):
        fake = hashlib.sha256(b"fake" + j.to_bytes(4, "big")).digest()
        reveals = {**co.nonces, COLLUDERS[-1]: fake}
        seed = graph_seed(SESSION, {i: graph_commit(n) for i, n in reveals.items()}, reveals)  # as if unchecked
        if set(COLLUDERS) <= cfg.neighbours_of(seed, ids, TARGET):
            break
    target = _graph_round(co, SESSION, reveal={COLLUDERS[-1]: fake})
    assert not _colluders_hold_majority(target), sorted(target.neighbours)
    assert not target.graph_sparse  # the complete graph: secure, only more traffic


def test_server_dropping_members_to_rekey_the_graph_gets_the_complete_graph():
    """The server leaves honest members out of U1 until the seed over the rest suits it: any U1 other
    than the committed set gives the complete graph."""
    import itertools

    co = Cohort(N_GRAPH, seed=7)
    ids = list(range(1, N_GRAPH + 1))
    cfg = MaskingConfig(threshold=11, vector_length=DIM, neighbours=DEGREE)
    honest = [i for i in ids if i not in COLLUDERS and i != TARGET]
    drop = ()
    for k in (1, 2, 3):
        for drop in itertools.combinations(honest, k):
            left = {i: co.nonces[i] for i in ids if i not in drop}
            seed = graph_seed(SESSION, {i: graph_commit(n) for i, n in left.items()}, left)  # as if unchecked
            if set(COLLUDERS) <= cfg.neighbours_of(seed, sorted(left), TARGET):
                break
        else:
            continue
        break
    target = _graph_round(co, SESSION, drop=drop)
    assert not _colluders_hold_majority(target) and not target.graph_sparse, (drop, sorted(target.neighbours))


# ====================================================================== 3. policy bounds and pins
@pytest.mark.parametrize("tamper, field", [
    (lambda c: {**c, "clip_norm": 1e-12}, "clip_norm"),
    (lambda c: {**c, "train": {**c["train"], "lr": 0.0}}, "train.lr"),
    (lambda c: {**c, "train": {**c["train"], "lr": 50.0}}, "train.lr"),
    (lambda c: {**c, "secagg_options": {**c["secagg_options"], "frac_bits": 2}}, "secagg_options.frac_bits"),
], ids=["tiny-clip", "lr-zero", "lr-huge", "frac-bits-2"])
def test_fields_that_change_what_leaves_the_site_are_bounded(server_dir, tmp_path, monkeypatch, tamper, field):
    out = run_client(server_dir, tmp_path / "st", monkeypatch, tamper=tamper)
    assert_refused_before_training(*out, tmp_path / "st", field)


def test_a_small_secagg_plus_degree_is_refused():
    """``neighbours: 2`` lets two colluders hold a majority of a site's share holders (the issue's attack
    with a ground session id); the site requires the library's own degree, or the complete graph."""
    big = Cohort(80)
    me = (1, pub(big.keys[1]))
    for k, ok in ((2, False), (24, False), (26, True)):  # 80 sites: 2 * ceil(log2 80) + 12 = 26
        cfg = big.config(secagg_options={"neighbours": k})
        if ok:
            check_round_policy(ClientPolicy(), cfg, self_identity=me)
            continue
        with pytest.raises(PolicyViolation) as ei:
            check_round_policy(ClientPolicy(), cfg, self_identity=me)
        assert ei.value.field == "secagg_options.neighbours" and "at least 26" in ei.value.policy_value
    small = Cohort(10)
    with pytest.raises(PolicyViolation, match="at least 9"):  # up to 64 sites: the complete graph only
        check_round_policy(ClientPolicy(), small.config(secagg_options={"neighbours": 4}),
                           self_identity=(1, pub(small.keys[1])))


@pytest.mark.parametrize("change, field", [
    (lambda c: {**c, "a_seed": 8}, "a_seed"),
    (lambda c: {**c, "dim": c["dim"]}, None),  # unchanged: accepted again after the restart
    (lambda c: {**c, "train": {**c["train"], "lora": {"r": 64, "target_modules": ["lm_head"]}}}, "train.lora"),
], ids=["a-seed", "same", "lora-targets"])
def test_federation_pins_survive_a_restart(server_dir, tmp_path, monkeypatch, change, field):
    """The first accepted round pins a_seed, dim and train.lora in the state folder; a restarted client
    (a new process: nothing in memory) refuses a config that changes them."""
    state = tmp_path / "st"
    srv, trainer, err, _ = run_client(server_dir, state, monkeypatch)
    assert err is None and trainer.calls == [1] and (state / "federation_pins.json").exists()
    pins = json.loads((state / "federation_pins.json").read_text())
    assert pins["fields"]["a_seed"] == 7 and pins["pinned_at_round"] == 1
    (state / "used_sessions.json").unlink()  # the double reuses its session id; the pin must refuse first
    out = run_client(server_dir, state, monkeypatch, tamper=change)
    if field is None:
        assert out[2] is None and out[1].calls == [1]
        return
    assert isinstance(out[2], PolicyViolation) and out[2].field == field and out[1].calls == []
    assert "pinned at round 1" in str(out[2])


# ====================================================================== 4. the cohort roster
def _cfg_for_policy(co: Cohort, **over) -> dict:
    return co.config(**over)


def test_unrostered_cohort_member_is_refused():
    co = Cohort(3)
    fp = {i: identity_fingerprint(pub(k)) for i, k in co.keys.items()}
    pol = ClientPolicy(roster=frozenset({fp[1], fp[2]}))  # site 3 is a member the server enrolled itself
    with pytest.raises(PolicyViolation) as ei:
        check_round_policy(pol, co.config(), self_identity=(1, pub(co.keys[1])))
    assert ei.value.field == "secagg_options.identities" and "1 of 2 peers" in ei.value.server_value
    check_round_policy(ClientPolicy(roster=frozenset(fp.values())), co.config(), self_identity=(1, pub(co.keys[1])))
    check_round_policy(ClientPolicy(roster=frozenset({fp[2]}), min_rostered_peers=1), co.config(),
                       self_identity=(1, pub(co.keys[1])))


def _he_cfg(co: Cohort, key_holder: int, round_id: int = 1) -> dict:
    he = {"params": {}, "key_holder": key_holder, "verify_aggregate": True}
    return co.config(mode="he", threshold=2, round_id=round_id, secagg_options={"he": he})


def test_he_needs_a_roster_a_rostered_key_holder_and_the_announced_rotation():
    co = Cohort(3)
    me = (2, pub(co.keys[2]))
    fp = {i: identity_fingerprint(pub(k)) for i, k in co.keys.items()}
    with pytest.raises(PolicyViolation) as ei:  # no roster: refused by default
        check_round_policy(ClientPolicy(), _he_cfg(co, 1), self_identity=me)
    assert ei.value.field == "mode" and "he_requires_roster" in ei.value.policy_value
    roster = ClientPolicy(roster=frozenset(fp.values()))
    check_round_policy(roster, _he_cfg(co, 1), self_identity=me)  # round 1: key holder 1, rostered
    with pytest.raises(PolicyViolation) as ei:  # the server names its own pick, out of turn
        check_round_policy(roster, _he_cfg(co, 3), self_identity=me)
    assert ei.value.field == "secagg_options.he.key_holder" and "rotation" in ei.value.policy_value
    partial = ClientPolicy(roster=frozenset({fp[3]}), min_rostered_peers=1)  # key holder 1 not rostered
    with pytest.raises(PolicyViolation) as ei:
        check_round_policy(partial, _he_cfg(co, 1), self_identity=me)
    assert ei.value.field == "secagg_options.he.key_holder" and "rostered" in ei.value.policy_value


def test_client_roster_prints_this_sites_fingerprint(tmp_path):
    from typer.testing import CliRunner

    import fedproxy_secure.cli.client_site  # noqa: F401  (registers the commands)
    from fedproxy_secure.artifacts.keys import save_private_key
    from fedproxy_secure.cli.app import app

    key = generate_key()
    (tmp_path / "st").mkdir()
    save_private_key(key, tmp_path / "st" / "identity.key")
    r = CliRunner().invoke(app, ["client", "roster", "--state", str(tmp_path / "st")])
    assert r.exit_code == 0, r.output
    fp = identity_fingerprint(pub(key))
    assert fp in r.output.replace(" ", "").replace("\n", "")


# ====================================================================== 5. DP a site can require
def test_site_config_with_dp_off_is_refused_and_fails_audit_check(tmp_path):
    from fedproxy_secure.audit.check import client_policy_view
    from fedproxy_secure.audit.controls import Deployment, client_policy_strength
    from fedproxy_secure.audit.controls import Policy as AuditPolicy
    from fedproxy_secure.client.join_config import load_join_config
    from fedproxy_secure.errors import ConfigError

    (tmp_path / "enrol").mkdir()
    (tmp_path / "enrol" / "server.json").write_text("{}")
    y = tmp_path / "client.yaml"
    y.write_text("enrolment: enrol\ntrainer: synthetic\ndp: {enabled: false}\n")
    with pytest.raises(ConfigError, match="policy.require_dp"):
        load_join_config(y)
    dep = Deployment(kind="network", source="x", n_clients=3, mode="masking", threshold=2, effective_threshold=2,
                     client_policy=client_policy_view(y))
    f = client_policy_strength(dep, AuditPolicy())
    assert f.status == "FAIL" and "dp.enabled is false" in f.message
    y.write_text("enrolment: enrol\ntrainer: synthetic\ndp: {enabled: false}\npolicy: {require_dp: false}\n")
    assert not load_join_config(y).dp.enabled  # an explicit opt-out, which audit check still FAILs
    dep = Deployment(kind="network", source="x", n_clients=3, mode="masking", threshold=2, effective_threshold=2,
                     client_policy=client_policy_view(y))
    assert client_policy_strength(dep, AuditPolicy()).status == "FAIL"


# ====================================================================== 6. SA-H-TIES
def test_sa_hties_t_of_norm_k_pointing_away_from_the_site_is_refused():
    """‖T‖ ≤ K alone admits T = K·e for any unit e: sent to one site, it reads as K − 1 peers identical to e,
    which drives that site's h (and its weight) to an extreme. The site knows its own x̂: the other K − 1
    unit vectors sum to T − x̂, so ‖T − x̂‖ ≤ K − 1."""
    from fedproxy_secure.wire.codec import vec_to_b64
    from fedproxy_secure.protocol.sa_hties_wire import check_public_t

    rng = np.random.default_rng(0)
    x = rng.standard_normal(DIM)
    x_hat = x / np.linalg.norm(x)
    e = np.zeros(DIM)
    e[int(np.argmin(np.abs(x_hat)))] = 1.0
    e -= (e @ x_hat) * x_hat
    e /= np.linalg.norm(e)  # a unit vector orthogonal to the site's update
    k = 3
    check_public_t(vec_to_b64(k * e), DIM, k)  # the old check alone passes it
    with pytest.raises(ProtocolAbort, match="K - 1"):
        check_public_t(vec_to_b64(k * e), DIM, k, own=x_hat)
    peers = [v / np.linalg.norm(v) for v in (rng.standard_normal(DIM), rng.standard_normal(DIM))]
    check_public_t(vec_to_b64(x_hat + sum(peers)), DIM, k, own=x_hat)  # an honest T passes


# ====================================================================== 7. evidence
def test_sites_keep_the_signed_configs_and_the_auditor_proves_equivocation(server_dir, tmp_path, monkeypatch):
    from fedproxy_secure.client.evidence import EvidenceLog, export_evidence, find_equivocation, verify_chain

    a, b = tmp_path / "a", tmp_path / "b"
    run_client(server_dir, a, monkeypatch)  # site A: the honest config
    run_client(server_dir, b, monkeypatch, tamper=lambda c: {**c, "clip_norm": 0.5})  # site B: another one
    entries = EvidenceLog(a).entries()
    assert verify_chain(entries) == (True, "")
    kept = [e for e in entries if e["kind"] == "round_config"]
    assert len(kept) == 1 and kept[0]["data"]["outcome"] == "accepted" and "signature" in kept[0]["data"]["config"]
    enrol = server_dir / "enrol" / "site0"
    ex_a, ex_b = export_evidence(a, enrol), export_evidence(b, enrol)
    assert find_equivocation([ex_a]) == []
    found = find_equivocation([ex_a, ex_b])
    assert len(found) == 1 and found[0]["round"] == 1 and len(found[0]["digests"]) == 2
    op = load_private_key(server_dir / "keys" / "operator.key").public_key()
    for signed in found[0]["configs"].values():
        verify_round_config(op, signed)  # both really carry the operator's signature: proof
    forged = json.loads(json.dumps(ex_b))
    forged["entries"][0]["data"]["outcome"] = "refused"
    with pytest.raises(SecurityError):
        find_equivocation([ex_a, forged])  # an edited entry is refused (its chain hash)
    relabelled = {**ex_b, "client_id": "c-someone-else"}
    with pytest.raises(SecurityError, match="signature does not verify"):
        find_equivocation([ex_a, relabelled])  # an export passed off as another site's (the site signature)


def test_evidence_log_is_append_only_and_a_rewrite_breaks_the_chain(tmp_path):
    from fedproxy_secure.client.evidence import EvidenceLog, verify_chain

    log = EvidenceLog(tmp_path)
    for r in range(1, 4):
        log.round_config(r, {"round_id": r, "kid": "k", "signature": "s"}, "accepted")
    assert verify_chain(log.entries())[0]
    assert oct((tmp_path / "evidence.jsonl").stat().st_mode & 0o777) == "0o600"
    lines = (tmp_path / "evidence.jsonl").read_text().splitlines()
    edited = json.loads(lines[1])
    edited["data"]["outcome"] = "refused: policy"  # rewrite what the site did, keep the links
    ok, why = verify_chain([json.loads(lines[0]), edited, json.loads(lines[2])])
    assert not ok and "entry 2: hash" in why
    del lines[1]
    (tmp_path / "evidence.jsonl").write_text("\n".join(lines) + "\n")
    ok, why = verify_chain(EvidenceLog(tmp_path).entries())
    assert not ok and "entry 2" in why


def test_flower_client_app_reveals_h_once_per_round_and_only_for_a_bounded_t():
    """The Flower ClientApp answered ``sa_reveal`` for any T, any number of times: a server could ask
    again with chosen T's and learn h as a function of T. Now: once per phase-A update, only for a T
    within ‖T − x̂‖ ≤ K − 1, and phase B must carry that same T."""
    pytest.importorskip("flwr")
    import time

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.app.metadata import Metadata

    from fedproxy_secure.flower.client_app import REVEAL, REVEAL_SUM, STATE_DELTA, _check_round_t, handle_reveal

    def query(t: np.ndarray, k: int, mid: str) -> Message:
        rec = RecordDict({REVEAL: ConfigRecord({"num_clients": k})})
        rec.array_records[REVEAL_SUM] = ArrayRecord([t])
        md = Metadata(run_id=1, message_id=mid, src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="g",
                      created_at=time.time(), ttl=3600.0, message_type=MessageType.QUERY)
        return Message(metadata=md, content=rec)

    rng = np.random.default_rng(2)
    x = rng.standard_normal(DIM) / 10
    x_hat = x / np.linalg.norm(x)
    peers = [v / np.linalg.norm(v) for v in rng.standard_normal((2, DIM))]
    t = x_hat + peers[0] + peers[1]
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    ctx.state.array_records[STATE_DELTA] = ArrayRecord([x])
    with pytest.raises(SecurityError, match="K - 1"):
        handle_reveal(query(3 * peers[0], 3, "m0"), ctx)  # ‖T‖ = K, pointing away from this node
    rep = handle_reveal(query(t, 3, "m1"), ctx)
    assert 0.0 <= rep.content.config_records[REVEAL]["h"] <= 1.0
    with pytest.raises(SecurityError, match="already revealed"):
        handle_reveal(query(t - peers[1] + x_hat, 3, "m2"), ctx)  # a second T for the same update
    with pytest.raises(SecurityError, match="differ"):
        _check_round_t(ctx, x, x_hat + peers[0] - peers[1], 3, revealed=True, coord_error=2.0 ** -19)
    _check_round_t(ctx, x, t, 3, revealed=True, coord_error=2.0 ** -19)  # the T it revealed h for
