"""SA-H-TIES: sum-only two-phase H-TIES; equal over plaintext and masked sums; close to H-TIES."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fedproxy_secure.aggregate import AggState, hties, make_aggregator
from fedproxy_secure.aggregate.hties import HTiesParams
from fedproxy_secure.aggregate.sa_hties import (
    pack,
    sa_client_h,
    sa_client_similarity,
    sa_h_range,
    sa_phase_a_client,
    sa_phase_b_client,
    sa_server_finish,
    unpack,
)
from fedproxy_secure.errors import ConfigError, DataError
from fedproxy_secure.secagg import make_summer


def clustered(k=8, p=2000, n_clusters=3, noise=0.8, seed=0):
    """Heterogeneous updates clipped to L2 norm <= 1 (as the trainer does before secure aggregation)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, p))
    ups = [centres[i % n_clusters] + noise * rng.normal(size=p) for i in range(k)]
    return [u / np.linalg.norm(u) * rng.uniform(0.3, 1.0) for u in ups]


def positively_aligned(k=6, p=1000, seed=0):
    """Updates whose pairwise cosines are all positive (shared direction + noise)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=p)
    return [(c + 0.9 * rng.normal(size=p)) / (3 * np.sqrt(p)) for _ in range(k)]


def masking_sum(vectors: list[np.ndarray]) -> np.ndarray:
    k = len(vectors)
    return make_summer("masking").secure_sum(
        {i + 1: v for i, v in enumerate(vectors)}, threshold=k, session_id=os.urandom(32)
    ).total


def test_phase_vectors_obey_documented_bounds():
    ups = clustered(8, 500, seed=1)
    a = [sa_phase_a_client(d) for d in ups]
    for norm_vec, sgn in a:
        assert np.abs(norm_vec).max() <= 1.0 and np.linalg.norm(norm_vec) == pytest.approx(1.0)
        assert set(np.unique(sgn)) <= {-1.0, 0.0, 1.0}
    t = sum(v[0] for v in a)
    for d in ups:
        m = sa_phase_b_client(d, t, num_clients=8, params=HTiesParams(h_norm="none"))
        assert 0 < m.weight <= 1 and 0 <= m.retention <= 1 and 0 <= m.h <= 1
        pos, neg, wp, wn = m.vectors
        assert np.all(pos >= 0) and np.all(neg <= 0) and np.abs(np.r_[pos, neg]).max() <= np.abs(d).max()
        assert np.all((wp >= 0) & (wp <= 1)) and np.all((wn >= 0) & (wn <= 1))
        assert not np.any((wp > 0) & (wn > 0))


def test_similarity_from_sum_equals_pairwise_cosines():
    ups = clustered(5, 300, seed=2)
    t = sum(sa_phase_a_client(d)[0] for d in ups)
    s = hties(ups).cosine
    for i, d in enumerate(ups):
        assert sa_client_similarity(d, t) == pytest.approx(s[i].sum() - s[i, i], abs=1e-12)


def test_sa_equals_hties_when_all_cosines_positive_and_h_revealed():
    # With every S_ij >= 0: sum S = sum |S| (same weights) and sum max(S,0) = max(sum S, 0) (same h),
    # so SA-H-TIES with h revealed is plaintext H-TIES exactly.
    ups = positively_aligned()
    ref = hties(ups)
    assert ref.cosine.min() > 0
    res = make_aggregator("sa_hties", h_norm="reveal").aggregate(ups, [1] * 6, AggState())
    np.testing.assert_allclose(res.delta, ref.delta, rtol=1e-9, atol=1e-15)
    np.testing.assert_array_equal(res.conflict, ref.conflict)
    sim = res.info["client_side_simulated"]
    np.testing.assert_allclose(sim["weights"], ref.weights, rtol=1e-9)
    np.testing.assert_allclose(sim["retention"], ref.retention, rtol=1e-12)


@pytest.mark.parametrize("h_norm", ["reveal", "none"])
def test_sa_invariants_identical_opposite_single(h_norm):
    agg = make_aggregator("sa_hties", h_norm=h_norm)
    d = clustered(1, 400, seed=3)[0]
    # identical updates: with 'none', h = 0 for every client, so r = r0 = 1; with 'reveal' h constant
    res = agg.aggregate([d] * 4, [1] * 4, AggState())
    np.testing.assert_allclose(res.delta, d, rtol=1e-12, atol=1e-15)
    res = agg.aggregate([d, -d], [1, 1], AggState())
    np.testing.assert_array_equal(res.delta, np.zeros(400))
    np.testing.assert_array_equal(res.conflict, np.ones(400))
    res = agg.aggregate([d], [1], AggState())
    np.testing.assert_allclose(res.delta, d, rtol=1e-12)


@pytest.mark.parametrize("h_norm", ["reveal", "none"])
def test_sa_conflict_is_exactly_plaintext_and_bounded(h_norm):
    ups = clustered(8, 1000, seed=4, noise=1.5)
    ups[5] = -ups[0]
    ref = hties(ups)
    res = make_aggregator("sa_hties", h_norm=h_norm).aggregate(ups, [1] * 8, AggState())
    np.testing.assert_array_equal(res.conflict, ref.conflict)
    assert np.all((res.conflict >= 0) & (res.conflict <= 1))
    sim = res.info["client_side_simulated"]
    assert sum(sim["weights"]) == pytest.approx(1.0)
    assert all(0 <= r <= 1 for r in sim["retention"])
    json.dumps(res.info)


def test_sa_departure_from_hties_is_small_on_heterogeneous_updates():
    """Statement with a measured number (see docs/experiments.md for the full table): on clustered
    heterogeneous updates (K=8, P=10000, 3 clusters, seed 0) the relative L2 difference of SA-H-TIES
    from plaintext H-TIES is 0.083 with h revealed and 0.186 without."""
    ups = clustered(8, 10000, seed=0, noise=0.7)
    ref = hties(ups).delta
    rel = {}
    for h_norm in ("reveal", "none"):
        d = make_aggregator("sa_hties", h_norm=h_norm).aggregate(ups, [1] * 8, AggState()).delta
        rel[h_norm] = np.linalg.norm(d - ref) / np.linalg.norm(ref)
    assert rel["reveal"] < 0.15, rel
    assert rel["none"] < 0.30, rel
    assert rel["reveal"] < rel["none"], rel


@pytest.mark.parametrize("h_norm", ["reveal", "none"])
def test_sa_over_masking_equals_sa_over_plaintext(h_norm):
    """SA-H-TIES over the masking mode's secure sums = over plaintext sums, to the encoding step."""
    k, p = 8, 300
    ups = clustered(k, p, seed=5, noise=1.0)
    prm = dict(h_norm=h_norm)
    plain = make_aggregator("sa_hties", **prm).aggregate(ups, [1] * k, AggState())
    masked = make_aggregator("sa_hties", secure_sum=masking_sum, **prm).aggregate(ups, [1] * k, AggState())
    np.testing.assert_allclose(masked.conflict, plain.conflict, atol=1e-8)
    # fixed-point step 2^-32 per value: the gate decisions and values agree except where the plaintext
    # mass ratio is within 1e-6 of rho (none expected here; asserted so the test means something)
    np.testing.assert_allclose(masked.delta, plain.delta, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(masked.delta == 0, plain.delta == 0)
    assert masked.info["client_side_simulated"]["retention"] == pytest.approx(
        plain.info["client_side_simulated"]["retention"], abs=1e-8)


def test_sa_over_plain_summer_interface_matches_numpy_sum():
    k, p = 4, 100
    ups = clustered(k, p, seed=6)

    def summer(vs):
        return make_summer("plain").secure_sum({i + 1: v for i, v in enumerate(vs)}, threshold=k,
                                               session_id=os.urandom(32)).total

    a = make_aggregator("sa_hties", secure_sum=summer).aggregate(ups, [1] * k, AggState())
    b = make_aggregator("sa_hties").aggregate(ups, [1] * k, AggState())
    np.testing.assert_array_equal(a.delta, b.delta)


def test_phase_functions_by_hand_match_aggregator():
    k, p = 5, 200
    ups = clustered(k, p, seed=7)
    prm = HTiesParams(h_norm="reveal")
    a_msgs = [sa_phase_a_client(d) for d in ups]
    sums_a = [sum(m[j] for m in a_msgs) for j in range(2)]
    h_range = sa_h_range([sa_client_h(d, sums_a[0], k) for d in ups], k)
    b_msgs = [sa_phase_b_client(d, sums_a[0], sums_a[1], prm, num_clients=k, h_range=h_range) for d in ups]
    sums_b = [sum(m.vectors[j] for m in b_msgs) for j in range(4)]
    res = sa_server_finish(sums_a, sums_b, k, prm)
    agg = make_aggregator("sa_hties", h_norm="reveal").aggregate(ups, [1] * k, AggState())
    np.testing.assert_allclose(res.delta, agg.delta, rtol=1e-12, atol=1e-15)
    assert agg.info["h_range"] == list(h_range)
    assert [np.array_equal(x, y) for x, y in zip(unpack(pack(sums_b), 4), sums_b)] == [True] * 4


def test_sa_phase_errors():
    d = np.ones(10)
    t = np.ones(10)
    with pytest.raises(ConfigError, match="h_range"):
        sa_phase_b_client(d, t, params=HTiesParams(h_norm="reveal"), num_clients=3)
    with pytest.raises(DataError, match="length 9"):
        sa_phase_b_client(d, np.ones(9), params=HTiesParams(h_norm="none"), num_clients=3)
    with pytest.raises(ConfigError, match="num_clients"):
        sa_phase_b_client(d, t, params=HTiesParams(h_norm="none"), num_clients=0)
    with pytest.raises(DataError, match="h_range"):
        sa_phase_b_client(d, t, params=HTiesParams(h_norm="reveal"), num_clients=3, h_range=(0.5, 0.1))
    with pytest.raises(DataError, match="2 clients revealed h but the cohort has 3"):
        sa_h_range([0.1, 0.2], 3)
    with pytest.raises(DataError, match="client 1 revealed h = 1.5"):
        sa_h_range([0.1, 1.5, 0.2], 3)
    with pytest.raises(DataError, match="expected 2 phase-A and 4 phase-B sums"):
        sa_server_finish([t, t], [t, t], 3)
    with pytest.raises(DataError, match="non-finite"):
        sa_server_finish([t, t], [t, t, t, np.r_[t[:-1], np.nan]], 3)
    with pytest.raises(DataError, match="2 x P"):
        unpack(np.ones(5), 2)


def test_sa_downweights_an_anti_aligned_client_where_hties_upweights_it():
    """The documented main departure: H-TIES weights by sum |S_ij| (an anti-aligned client scores
    high), SA-H-TIES by the signed sum (it scores low). See docs/decisions/sa-hties-signed-sums.md."""
    ups = clustered(8, 2000, seed=0, noise=0.7)
    ups[7] = -ups[0]
    ref = hties(ups)
    sa = make_aggregator("sa_hties").aggregate(ups, [1] * 8, AggState()).info["client_side_simulated"]["weights"]
    assert ref.weights[7] == max(ref.weights)
    assert sa[7] == min(sa) and sa[7] < 0.1 * ref.weights[7]


def test_sa_over_he_close_to_plaintext_sums():
    k, p = 6, 300
    ups = clustered(k, p, seed=8, noise=1.0)
    he = make_summer("he", clip=1.0, tolerance=1e-4, coeff_mod_bit_sizes=(60, 50), scale_bits=50)

    def he_sum(vs):
        return he.secure_sum({i + 1: v for i, v in enumerate(vs)}, threshold=k, session_id=os.urandom(32)).total

    plain = make_aggregator("sa_hties").aggregate(ups, [1] * k, AggState()).delta
    got = make_aggregator("sa_hties", secure_sum=he_sum).aggregate(ups, [1] * k, AggState()).delta
    assert np.linalg.norm(got - plain) / np.linalg.norm(plain) < 1e-3
