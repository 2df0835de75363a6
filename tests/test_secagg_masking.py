"""Masking-mode secure aggregation: exact sums under dropouts, aborts, malicious servers."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedproxy_secure.errors import ConfigError, ProtocolAbort
from fedproxy_secure.secagg import DropoutPlan, make_summer
from fedproxy_secure.secagg import messages as M
from fedproxy_secure.secagg.base import STAGES
from fedproxy_secure.secagg.encoding import FixedPointEncoder
from fedproxy_secure.secagg.masking import (
    ClientProtocol,
    ClientState,
    MaskingConfig,
    ServerProtocol,
    ServerState,
    derive_session_id,
)
from fedproxy_secure.secagg.prg import MaskExpander, pairwise_key

P = 257


def _vectors(n: int, p: int = P, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-1, 1, p) for i in range(1, n + 1)}


def _expected(vectors, survivors, enc=FixedPointEncoder()):
    acc = np.zeros(len(next(iter(vectors.values()))), dtype=np.uint64)
    for i in survivors:
        acc += enc.encode(vectors[i])
    return enc.decode(acc)


def _sid() -> bytes:
    return os.urandom(32)


# ----------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("n", range(2, 21))
def test_exact_sum_no_dropout(n):
    vs = _vectors(n, seed=n)
    r = make_summer("masking").secure_sum(vs, threshold=2, session_id=_sid())
    assert r.survivors == tuple(range(1, n + 1))
    np.testing.assert_array_equal(r.total, _expected(vs, r.survivors))  # exact to the encoding
    assert np.abs(r.total - sum(vs.values())).max() < n * 2.0**-32


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("n", range(3, 21))
def test_exact_sum_with_dropouts_at_each_stage(n, stage):
    vs = _vectors(n, seed=100 + n)
    t = max(2, n // 2)
    dropped = frozenset(range(2, 2 + n - t))  # n - t clients drop, exactly t remain
    r = make_summer("masking").secure_sum(
        vs, threshold=t, session_id=_sid(), dropouts=DropoutPlan({stage: dropped})
    )
    # a client silent before consistency/unmask already sent its masked input: it is summed
    expect = [i for i in vs if i not in dropped or stage in ("consistency", "unmask")]
    assert r.survivors == tuple(expect)
    np.testing.assert_array_equal(r.total, _expected(vs, expect))


@pytest.mark.parametrize("n", [6, 11, 20])
def test_dropouts_spread_over_all_stages(n):
    vs = _vectors(n, seed=7)
    plan = DropoutPlan({"advertise": frozenset({1}), "share": frozenset({2}),
                        "masked_input": frozenset({3}), "consistency": frozenset({4})})
    t = n - 4  # 4 clients drop in all: exactly t remain at the unmasking round
    r = make_summer("masking").secure_sum(vs, threshold=t, session_id=_sid(), dropouts=plan)
    expect = [i for i in vs if i not in (1, 2, 3)]
    assert r.survivors == tuple(expect)
    np.testing.assert_array_equal(r.total, _expected(vs, expect))
    assert r.stats["dropped"] == [3]


@pytest.mark.parametrize("stage", STAGES)
def test_abort_below_threshold_at_each_stage(stage):
    vs = _vectors(6)
    with pytest.raises(ProtocolAbort, match="threshold"):
        make_summer("masking").secure_sum(
            vs, threshold=4, session_id=_sid(), dropouts=DropoutPlan({stage: frozenset({1, 2, 3})})
        )


def test_secagg_plus_neighbour_graph_exact_with_dropouts():
    vs = _vectors(20, seed=3)
    # 3 drops in all: every client keeps >= 4 of its 7 share holders (itself + 6 neighbours), which
    # is the default neighbourhood threshold, whatever the (session-keyed random) graph
    plan = DropoutPlan({"share": frozenset({4}), "masked_input": frozenset({5}), "unmask": frozenset({11})})
    summer = make_summer("masking", neighbours=6)
    r = summer.secure_sum(vs, threshold=10, session_id=_sid(), dropouts=plan)
    expect = [i for i in vs if i not in (4, 5)]
    np.testing.assert_array_equal(r.total, _expected(vs, expect))
    # each client sends shares to its 6 neighbours only (not 19 peers)
    cfg = MaskingConfig(10, P, neighbours=6)
    g = cfg.graph(b"s" * 32, range(1, 21))
    assert all(len(nb) == 6 for nb in g.values()) and all(u in g[v] for u in g for v in g[u])
    assert r.stats["bytes_per_client"]["share"]["up"] < 0.5 * make_summer("masking").secure_sum(
        vs, threshold=10, session_id=_sid()).stats["bytes_per_client"]["share"]["up"]


def test_secagg_plus_too_many_lost_holders_aborts_cleanly():
    vs = _vectors(12, p=16)
    cfg = MaskingConfig(3, 16, neighbours=2)  # ring: holders = self + 2, threshold 2
    g = cfg.graph(b"q" * 32, vs)
    u = 1
    a, b = sorted(g[u])
    plan = DropoutPlan({"masked_input": frozenset({a}), "unmask": frozenset({b})})
    with pytest.raises(ProtocolAbort, match="round aborted"):
        make_summer("masking", neighbours=2).secure_sum(vs, threshold=3, session_id=b"q" * 32, dropouts=plan)


def test_weighted_and_clip_semantics():
    summer = make_summer("masking", clip_range=4.0, frac_bits=24)
    vs = {1: np.full(10, 0.5 * 3.0), 2: np.full(10, -0.25 * 2.0)}  # weights applied by the client
    r = summer.secure_sum(vs, threshold=2, session_id=_sid())
    np.testing.assert_allclose(r.total, 1.0, atol=2 * 2.0**-24)
    with pytest.raises(ConfigError, match="clip_range"):
        summer.secure_sum({1: np.full(10, 4.5), 2: np.zeros(10)}, threshold=2, session_id=_sid())
    with pytest.raises(ConfigError, match="NaN"):
        summer.secure_sum({1: np.full(10, np.nan), 2: np.zeros(10)}, threshold=2, session_id=_sid())


def test_overflowing_configuration_refused_up_front():
    with pytest.raises(ConfigError, match="overflow"):
        FixedPointEncoder(clip_range=1.0, frac_bits=40, max_clients=1 << 23)
    FixedPointEncoder(clip_range=1.0, frac_bits=40, max_clients=(1 << 22) - 1)
    with pytest.raises(ConfigError, match="max_clients"):
        make_summer("masking", max_clients=3).secure_sum(_vectors(4), threshold=2, session_id=_sid())


def test_two_runs_give_different_masked_vectors():
    vs = _vectors(3)
    cfg = MaskingConfig(2, P)
    outs = []
    for _ in range(2):
        sid = derive_session_id("fed-A", 1, os.urandom(16))
        srv, cl = _setup(vs, cfg, sid)
        _run_until(srv, cl, "consistency")
        outs.append(cl["masked"][1].vector.copy())
    assert not np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], FixedPointEncoder().encode(vs[1]))


def test_full_protocol_over_json_wire():
    vs = _vectors(5)
    cfg = MaskingConfig(3, P)
    sid = _sid()
    server = ServerProtocol(sid, cfg)
    clients = {i: ClientProtocol(i, sid, cfg, v) for i, v in vs.items()}

    def wire(m):
        return M.message_from_dict(json.loads(json.dumps(m.to_dict())))

    for c in clients.values():
        assert server.receive(wire(c.advertise()))
    for _ in range(4):
        for i, msg in server.advance().items():
            assert server.receive(wire(clients[i].handle(wire(msg))))
    server.advance()
    assert server.state is ServerState.DONE
    np.testing.assert_array_equal(FixedPointEncoder().decode(server.result()), _expected(vs, vs))


def test_message_parsing_is_strict():
    good = M.ConsistencyCheck(b"s" * 32, 1, (1, 2)).to_dict()
    assert M.message_from_dict(good) == M.ConsistencyCheck(b"s" * 32, 1, (1, 2))
    for bad in (
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "survivors"},
        {**good, "survivors": [1, -2]},
        {**good, "survivors": [1, True]},
        {**good, "recipient": "1"},
        {**good, "session_id": "not base64!"},
        {**good, "type": "nope"},
        [good],
    ):
        with pytest.raises(ProtocolAbort):
            M.message_from_dict(bad)
    with pytest.raises(ProtocolAbort):
        M.MaskedInput.from_dict({"type": "masked_input", "session_id": "AA==", "client_id": 1, "vector": "AAA="})


# ----------------------------------------------------------------------------- protocol driver
def _setup(vs, cfg, sid, **kw):
    server = ServerProtocol(sid, cfg, **{k: v for k, v in kw.items() if k == "peer_identities"})
    clients = {i: ClientProtocol(i, sid, cfg, v, **kw.get("client_kw", {}).get(i, {})) for i, v in vs.items()}
    for c in clients.values():
        server.receive(c.advertise())
    return server, {"c": clients, "out": None, "masked": {}}


def _run_until(server, st, stage, skip=None):
    """Advance round by round up to (and including the replies of) ``stage``; return last outbox."""
    order = STAGES[1:]
    for s in order:
        out = server.advance()
        st["out"] = out
        if s == stage:
            return out
        for i, msg in out.items():
            if i in (skip or {}).get(s, ()):
                continue
            reply = st["c"][i].handle(msg)
            if isinstance(reply, M.MaskedInput):
                st["masked"][i] = reply
            server.receive(reply)
    return None


def _client_at(stage, n=5, t=3, **kw):
    """A fresh session driven honestly until client 1 is about to handle ``stage``'s server message."""
    vs = _vectors(n)
    cfg = MaskingConfig(t, P)
    sid = _sid()
    server, st = _setup(vs, cfg, sid, **kw)
    out = _run_until(server, st, stage)
    return st["c"][1], out[1], sid, st, server


def _assert_aborts(client, msg, match=None):
    with pytest.raises(ProtocolAbort, match=match):
        client.handle(msg)
    assert client.state is ClientState.ABORTED
    with pytest.raises(ProtocolAbort):  # stays aborted
        client.handle(msg)


# ----------------------------------------------------------------------------- malicious server
def test_client_aborts_when_marked_dropped():
    c, msg, *_ = _client_at("unmask")
    _assert_aborts(c, dataclasses.replace(msg, survivors=tuple(i for i in msg.survivors if i != 1),
                                          dropped=msg.dropped + (1,)), "dropped")


def test_client_aborts_when_listed_alive_and_dropped():
    c, msg, *_ = _client_at("unmask")
    _assert_aborts(c, dataclasses.replace(msg, dropped=(2,)), "both alive and dropped")


def test_client_refuses_both_shares_of_one_peer_even_if_split_over_stages():
    # honest run where 2 dropped before masked input; the server then claims 2 survived
    vs = _vectors(5)
    cfg = MaskingConfig(3, P)
    server, st = _setup(vs, cfg, _sid())
    out = _run_until(server, st, "unmask", skip={"masked_input": {2}})
    msg = out[1]
    assert msg.dropped == (2,)
    _assert_aborts(st["c"][1], dataclasses.replace(msg, survivors=msg.survivors + (2,)), "alive and dropped|differs")


def test_client_aborts_on_unknown_ids():
    c, msg, *_ = _client_at("unmask")
    _assert_aborts(c, dataclasses.replace(msg, dropped=(99,)), "unknown")
    c, msg, *_ = _client_at("consistency")
    _assert_aborts(c, dataclasses.replace(msg, survivors=msg.survivors + (42,)), "unknown")


def test_client_aborts_on_duplicated_ids():
    c, msg, *_ = _client_at("share")
    _assert_aborts(c, dataclasses.replace(msg, keys=msg.keys + (msg.keys[2],)), "duplicated")
    c, msg, *_ = _client_at("masked_input")
    _assert_aborts(c, dataclasses.replace(msg, ciphertexts=msg.ciphertexts + (msg.ciphertexts[0],)), "duplicated")
    c, msg, *_ = _client_at("consistency")
    _assert_aborts(c, dataclasses.replace(msg, survivors=msg.survivors + (3,)), "duplicated")


def test_client_aborts_on_too_few_peers():
    c, msg, *_ = _client_at("share")
    _assert_aborts(c, dataclasses.replace(msg, keys=msg.keys[:2]), "threshold")
    c, msg, *_ = _client_at("masked_input")
    _assert_aborts(c, dataclasses.replace(msg, ciphertexts=msg.ciphertexts[:1]), "too few")
    c, msg, *_ = _client_at("consistency")
    _assert_aborts(c, dataclasses.replace(msg, survivors=(1, 2)), "threshold")


def test_client_aborts_on_wrong_key_sizes_or_reused_keys():
    c, msg, *_ = _client_at("share")
    k = msg.keys[3]
    bad = msg.keys[:3] + (dataclasses.replace(k, enc_pk=k.enc_pk[:31]),) + msg.keys[4:]
    _assert_aborts(c, dataclasses.replace(msg, keys=bad), "32 bytes")
    c, msg, *_ = _client_at("share")
    k = msg.keys[3]
    bad = msg.keys[:3] + (dataclasses.replace(k, mask_pk=msg.keys[2].mask_pk),) + msg.keys[4:]
    _assert_aborts(c, dataclasses.replace(msg, keys=bad), "reused")


def test_client_aborts_when_own_keys_altered():
    c, msg, *_ = _client_at("share")
    own = msg.keys[0]
    _assert_aborts(c, dataclasses.replace(msg, keys=(dataclasses.replace(own, enc_pk=os.urandom(32)),) + msg.keys[1:]),
                   "own keys")


def test_client_aborts_on_tampered_share_ciphertext():
    c, msg, *_ = _client_at("masked_input")
    ct = msg.ciphertexts[0]
    flipped = ct.data[:-1] + bytes([ct.data[-1] ^ 1])
    _assert_aborts(c, dataclasses.replace(msg, ciphertexts=(dataclasses.replace(ct, data=flipped),) + msg.ciphertexts[1:]),
                   "authentication")


def test_client_aborts_on_replayed_or_foreign_session():
    c, msg, *_ = _client_at("share")
    _assert_aborts(c, dataclasses.replace(msg, session_id=os.urandom(32)), "session id")
    # replay of an earlier message of the *same* session once the client moved on
    c, msg, sid, st, server = _client_at("share")
    c.handle(msg)
    _assert_aborts(c, msg, "replay or out of order")
    # a whole session id seen before is refused by a client that remembers its sessions
    used: set[bytes] = set()
    sid = derive_session_id("fed", 3)
    ClientProtocol(1, sid, MaskingConfig(2, 4), np.zeros(4), used_sessions=used)
    with pytest.raises(ProtocolAbort, match="replay"):
        ClientProtocol(1, sid, MaskingConfig(2, 4), np.zeros(4), used_sessions=used)


def test_client_aborts_when_left_out_of_survivors_or_survivors_change():
    c, msg, *_ = _client_at("consistency")
    _assert_aborts(c, dataclasses.replace(msg, survivors=tuple(i for i in msg.survivors if i != 1)), "omits")
    c, msg, *_ = _client_at("unmask")
    _assert_aborts(c, dataclasses.replace(msg, survivors=msg.survivors[:-1], dropped=msg.survivors[-1:]), "differs")


def test_identity_keys_detect_key_substitution_and_missing_signatures():
    ids = {i: Ed25519PrivateKey.generate() for i in range(1, 6)}
    pubs = {i: k.public_key() for i, k in ids.items()}
    kw = {"peer_identities": pubs, "client_kw": {i: {"identity_key": ids[i], "peer_identities": pubs} for i in ids}}
    # honest run with signatures completes exactly
    vs = _vectors(5)
    cfg = MaskingConfig(3, P)
    server, st = _setup(vs, cfg, _sid(), **kw)
    for i, msg in _run_until(server, st, "unmask").items():
        assert server.receive(st["c"][i].handle(msg))
    server.advance()
    np.testing.assert_array_equal(FixedPointEncoder().decode(server.result()), _expected(vs, vs))
    # server substitutes client 3's mask key (man in the middle)
    c, msg, *_ = _client_at("share", **kw)
    k = msg.keys[2]
    bad = msg.keys[:2] + (dataclasses.replace(k, mask_pk=os.urandom(32)),) + msg.keys[3:]
    _assert_aborts(c, dataclasses.replace(msg, keys=bad), "signature")
    # server withholds the consistency signatures
    c, msg, *_ = _client_at("unmask", **kw)
    _assert_aborts(c, dataclasses.replace(msg, signatures=msg.signatures[:2]), "signatures")


# ----------------------------------------------------------------------------- dropped stays hidden
def test_late_masked_input_from_dropped_client_stays_hidden():
    vs = _vectors(5)
    cfg = MaskingConfig(3, P)
    sid = _sid()
    server, st = _setup(vs, cfg, sid)
    c = st["c"]
    # rounds 0-1 honestly
    for s in ("share", "masked_input"):
        for i, msg in server.advance().items():
            reply = c[i].handle(msg)
            if isinstance(reply, M.MaskedInput) and i == 3:
                late = reply  # client 3 is slow: its masked input arrives after the deadline
                continue
            server.receive(reply)
    checks = server.advance()  # U3 fixed without client 3
    assert 3 not in checks
    assert server.receive(late) is False and "late" in server.rejected[-1][1]
    for i, msg in checks.items():
        server.receive(c[i].handle(msg))
    responses = {}
    for i, msg in server.advance().items():
        assert msg.dropped == (3,)
        responses[i] = c[i].handle(msg)
        server.receive(responses[i])
    server.advance()
    np.testing.assert_array_equal(FixedPointEncoder().decode(server.result()), _expected(vs, [1, 2, 4, 5]))
    # no honest client released a share of client 3's self mask: only its mask key
    assert all(s.owner_id != 3 for r in responses.values() for s in r.self_mask_shares)
    assert all(any(s.owner_id == 3 for s in r.key_shares) for r in responses.values())
    # even knowing every pairwise mask of client 3, the late vector is x_3 + PRG(b_3): hidden
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from fedproxy_secure.secagg.shamir import combine_shares

    sk3 = X25519PrivateKey.from_private_bytes(
        combine_shares({i: next(s.share for s in r.key_shares if s.owner_id == 3) for i, r in responses.items()}, 3, 32))
    y = late.vector.copy()
    prg = MaskExpander(P)
    for v in (1, 2, 4, 5):
        shared = sk3.exchange(X25519PublicKey.from_public_bytes(server._keys[v].mask_pk))
        prg.add_into(y, pairwise_key(shared, sid, 3, v), -1 if 3 < v else 1)
    x3 = FixedPointEncoder().encode(vs[3])
    residual = (y - x3).view(np.int64)  # = PRG(b_3): uniform over 2^64, never small
    assert np.all(np.abs(residual.astype(np.float64)) > 2.0**40)
    decoded = FixedPointEncoder().decode(y)
    assert np.abs(decoded).min() > 1000  # nothing resembling an update in [-1, 1]


def test_server_rejects_bad_client_messages_without_aborting():
    vs = _vectors(4)
    cfg = MaskingConfig(2, P)
    sid = _sid()
    server = ServerProtocol(sid, cfg)
    clients = {i: ClientProtocol(i, sid, cfg, v) for i, v in vs.items()}
    adv = {i: c.advertise() for i, c in clients.items()}
    assert server.receive(adv[1]) and not server.receive(adv[1])  # duplicate
    assert not server.receive(dataclasses.replace(adv[2], session_id=os.urandom(32)))
    for i in (2, 3, 4):
        server.receive(adv[i])
    out = server.advance()
    sk = clients[1].handle(out[1])
    assert not server.receive(dataclasses.replace(sk, ciphertexts=sk.ciphertexts[:1]))
    assert server.state is ServerState.COLLECT_SHARES
