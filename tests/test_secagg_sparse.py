"""SecAgg+ sparse neighbour graph (Bell et al. CCS'20) as the default for large cohorts.

Exact sums with dropouts at every stage, aborts when a survivor keeps too few share holders, and
refusal of malformed neighbour sets, all on the automatic k-regular graph.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest

from fedproxy_secure.errors import ConfigError, ProtocolAbort
from fedproxy_secure.wire.threshold import (
    SPARSE_CUTOFF,
    effective_threshold,
    neighbourhood_threshold,
    secagg_plus_degree,
)
from fedproxy_secure.secagg import DropoutPlan, make_summer
from fedproxy_secure.secagg import messages as M
from fedproxy_secure.secagg.base import STAGES
from fedproxy_secure.secagg.encoding import FixedPointEncoder
from fedproxy_secure.secagg.masking import (
    ClientProtocol,
    ClientState,
    MaskingConfig,
    ServerProtocol,
    check_graph,
)

N = 80  # above SPARSE_CUTOFF: the automatic graph is sparse
P = 16


def _vectors(n: int = N, p: int = P, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-1, 1, p) for i in range(1, n + 1)}


def _expected(vectors, survivors) -> np.ndarray:
    enc = FixedPointEncoder()
    acc = np.zeros(len(next(iter(vectors.values()))), dtype=np.uint64)
    for i in survivors:
        acc += enc.encode(vectors[i])
    return enc.decode(acc)


def _t(n: int = N) -> int:
    return effective_threshold("masking", n)


# ----------------------------------------------------------------------------- the rule
def test_degree_rule_complete_below_cutoff_log_growth_above():
    assert secagg_plus_degree(SPARSE_CUTOFF) is None
    assert secagg_plus_degree(10) is None
    ks = {n: secagg_plus_degree(n) for n in (100, 1000, 10_000, 100_000)}
    for n, k in ks.items():
        assert k is not None and k % 2 == 0 and k < n - 1
        assert k == 2 * math.ceil(math.log2(n)) + 12 + (2 * math.ceil(math.log2(n)) + 12) % 2
    # log growth: each 10x in n adds about 2*log2(10) ~ 6.6 neighbours, never a factor
    steps = [ks[10 * n] - ks[n] for n in (100, 1000, 10_000)]
    assert all(6 <= s <= 8 for s in steps), steps


def test_neighbourhood_threshold_is_a_strict_majority_of_k_plus_one():
    for k in range(2, 60):
        t = neighbourhood_threshold(k)
        assert 2 * t > k + 1 and 2 * (t - 1) <= k + 1
    with pytest.raises(ValueError, match="neighbours"):
        neighbourhood_threshold(1)


def test_automatic_graph_is_k_regular_symmetric_and_keyed():
    cfg = MaskingConfig(_t(), P)
    k = secagg_plus_degree(N)
    g = cfg.graph(b"a" * 32, range(1, N + 1))
    check_graph(g)
    assert {len(nb) for nb in g.values()} == {k}
    assert g != cfg.graph(b"b" * 32, range(1, N + 1))  # session-keyed random graph
    small = cfg.graph(b"a" * 32, range(1, SPARSE_CUTOFF + 1))
    assert all(len(nb) == SPARSE_CUTOFF - 1 for nb in small.values())
    forced = MaskingConfig(_t(), P, complete_graph=True).graph(b"a" * 32, range(1, N + 1))
    assert all(len(nb) == N - 1 for nb in forced.values())
    assert cfg.share_threshold(k + 1, complete=False) == neighbourhood_threshold(k)


# ----------------------------------------------------------------------------- exact sums
@pytest.mark.parametrize("stage", STAGES)
def test_exact_sum_with_dropouts_at_each_stage_on_sparse_graph(stage):
    vs = _vectors(seed=hash(stage) % 1000)
    dropped = frozenset({3, 17, 40, 41, 77})
    r = make_summer("masking").secure_sum(
        vs, threshold=_t(), session_id=os.urandom(32), dropouts=DropoutPlan({stage: dropped}))
    assert r.stats["degree"] == secagg_plus_degree(N)
    # a client silent before its masked input is left out; one silent later is still in the sum
    before_input = STAGES.index(stage) <= STAGES.index("masked_input")
    expect = [i for i in vs if not (before_input and i in dropped)]
    assert r.survivors == tuple(expect)
    np.testing.assert_array_equal(r.total, _expected(vs, expect))


def test_exact_sum_with_dropouts_spread_over_all_stages_on_sparse_graph():
    vs = _vectors(seed=5)
    plan = DropoutPlan({s: frozenset({10 + i, 50 + i}) for i, s in enumerate(STAGES)})
    r = make_summer("masking").secure_sum(vs, threshold=_t(), session_id=os.urandom(32), dropouts=plan)
    lost = {i for s in STAGES[: STAGES.index("masked_input") + 1] for i in plan.dropped_by(s)}
    expect = [i for i in vs if i not in lost]
    np.testing.assert_array_equal(r.total, _expected(vs, expect))
    # each client sent shares to its k neighbours only
    assert r.stats["bytes_per_client"]["share"]["up"] > 0


# ----------------------------------------------------------------------------- aborts
def _neighbours_of(u: int, sid: bytes) -> list[int]:
    return sorted(MaskingConfig(_t(), P).graph(sid, range(1, N + 1))[u])


def test_survivor_with_too_few_holders_at_unmasking_aborts():
    sid = os.urandom(32)
    k = secagg_plus_degree(N)
    need = neighbourhood_threshold(k)
    # client 1 survives, but k + 1 - need + 1 of its holders go silent before unmasking
    lost = frozenset(_neighbours_of(1, sid)[: k + 2 - need])
    assert N - len(lost) >= _t()  # the global threshold alone would not abort
    with pytest.raises(ProtocolAbort, match="round aborted"):
        make_summer("masking").secure_sum(
            _vectors(), threshold=_t(), session_id=sid, dropouts=DropoutPlan({"unmask": lost}))


def test_survivor_with_too_few_neighbours_sharing_aborts():
    sid = os.urandom(32)
    k = secagg_plus_degree(N)
    lost = frozenset(_neighbours_of(1, sid)[: k + 2 - neighbourhood_threshold(k)])
    with pytest.raises(ProtocolAbort, match="too few for the threshold"):
        make_summer("masking").secure_sum(
            _vectors(), threshold=_t(), session_id=sid, dropouts=DropoutPlan({"share": lost}))


def test_one_fewer_lost_holder_still_gives_the_exact_sum():
    sid = os.urandom(32)
    k = secagg_plus_degree(N)
    lost = frozenset(_neighbours_of(1, sid)[: k + 1 - neighbourhood_threshold(k)])
    vs = _vectors()
    r = make_summer("masking").secure_sum(vs, threshold=_t(), session_id=sid, dropouts=DropoutPlan({"unmask": lost}))
    np.testing.assert_array_equal(r.total, _expected(vs, vs))


# ----------------------------------------------------------------------------- malformed neighbour sets
def _to_share_stage(sid: bytes):
    cfg = MaskingConfig(_t(), P)
    vs = _vectors()
    server = ServerProtocol(sid, cfg)
    clients = {i: ClientProtocol(i, sid, cfg, v) for i, v in vs.items()}
    for c in clients.values():
        assert server.receive(c.advertise())
    shares = {i: clients[i].handle(m) for i, m in server.advance().items()}
    return cfg, server, clients, shares


def test_share_keys_addressed_to_a_non_neighbour_is_refused():
    sid = os.urandom(32)
    cfg, server, clients, shares = _to_share_stage(sid)
    nb = set(_neighbours_of(1, sid))
    outsider = min(set(range(2, N + 1)) - nb)
    good = shares[1]
    c0 = good.ciphertexts[0]
    swapped = dataclasses.replace(good, ciphertexts=(M.Ciphertext(outsider, c0.data),) + good.ciphertexts[1:])
    assert not server.receive(swapped)
    assert "exactly the client's neighbours" in server.rejected[-1][1]
    missing = dataclasses.replace(good, ciphertexts=good.ciphertexts[1:])
    assert not server.receive(missing)
    assert server.receive(good)


def test_share_broadcast_from_a_non_neighbour_makes_the_client_abort():
    sid = os.urandom(32)
    cfg, server, clients, shares = _to_share_stage(sid)
    for m in shares.values():
        assert server.receive(m)
    out = server.advance()
    nb = set(_neighbours_of(1, sid))
    outsider = min(set(range(2, N + 1)) - nb)
    forged = dataclasses.replace(out[1], ciphertexts=out[1].ciphertexts + (M.Ciphertext(outsider, b"x" * 60),))
    with pytest.raises(ProtocolAbort, match="unknown client ids"):
        clients[1].handle(forged)
    assert clients[1].state is ClientState.ABORTED


def test_unmask_response_with_shares_the_client_does_not_hold_is_refused():
    sid = os.urandom(32)
    cfg, server, clients, shares = _to_share_stage(sid)
    for m in shares.values():
        server.receive(m)
    for _ in range(2):  # share broadcast, consistency check
        replies = {i: clients[i].handle(m) for i, m in server.advance().items()}
        for m in replies.values():
            server.receive(m)
    requests = server.advance()
    nb = set(_neighbours_of(1, sid))
    outsider = min(set(range(2, N + 1)) - nb)
    good = clients[1].handle(requests[1])
    forged = dataclasses.replace(good, self_mask_shares=good.self_mask_shares + (M.Share(outsider, good.self_mask_shares[0].share),))
    assert not server.receive(forged)
    assert "holds none for that owner" in server.rejected[-1][1]


@pytest.mark.parametrize("bad, why", [
    ({1: frozenset({2}), 2: frozenset(), 3: frozenset({1})}, "degrees"),
    ({1: frozenset({1}), 2: frozenset({3}), 3: frozenset({2})}, "own neighbour"),
    ({1: frozenset({2}), 2: frozenset({1}), 3: frozenset({9})}, "unknown"),
    ({1: frozenset({2}), 2: frozenset({3}), 3: frozenset({1})}, "not symmetric"),
])
def test_check_graph_refuses_malformed_graphs(bad, why):
    with pytest.raises(ProtocolAbort, match=why):
        check_graph(bad)


def test_conflicting_graph_options_are_refused():
    with pytest.raises(ConfigError, match="complete_graph"):
        MaskingConfig(3, P, neighbours=6, complete_graph=True)


# ----------------------------------------------------------------------------- fast paths agree
def test_neighbours_of_matches_the_whole_graph():
    for n in (5, SPARSE_CUTOFF + 1, 150):
        cfg = MaskingConfig(_t(n), P)
        g = cfg.graph(b"z" * 32, range(1, n + 1))
        assert all(cfg.neighbours_of(b"z" * 32, range(1, n + 1), u) == g[u] for u in g)


@pytest.mark.parametrize("length, block", [(1, 4), (1000, 64), (1003, 64), (5000, 1 << 15)])
def test_streamed_masks_equal_the_reference_expander(length, block):
    from fedproxy_secure.secagg.masking import add_masks_streamed
    from fedproxy_secure.secagg.prg import MaskExpander

    rng = np.random.default_rng(length)
    start = rng.integers(0, 2**63, length, dtype=np.uint64)
    keys = [(os.urandom(32), +1), (os.urandom(32), -1), (os.urandom(32), +1)]
    ref = start.copy()
    prg = MaskExpander(length)
    for k, sign in keys:
        prg.add_into(ref, k, sign)
    got = np.zeros(length, dtype=np.uint64)

    def fill(sl: slice) -> None:
        got[sl] = start[sl]

    add_masks_streamed(got, keys, fill, block=block)
    np.testing.assert_array_equal(got, ref)
    assert not np.array_equal(got, start)
