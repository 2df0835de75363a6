"""FedAvg, FedProx, PCR, TIES and plaintext H-TIES: the properties DESIGN §1 stage ii promises."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedproxy_secure.aggregate import AggState, fedavg, hties, make_aggregator, ties
from fedproxy_secure.aggregate.fedprox import prox_penalty
from fedproxy_secure.aggregate.hties import HTiesParams, gated_merge, minmax, pairwise_cosine
from fedproxy_secure.aggregate.pcr import pcr_penalty
from fedproxy_secure.aggregate.ties import keep_count, trim_top


def clustered(k=8, p=2000, n_clusters=3, noise=0.8, seed=0, unit=True):
    """Heterogeneous updates: a few shared directions plus per-client noise, scaled differently."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, p))
    ups = [centres[i % n_clusters] + noise * rng.normal(size=p) for i in range(k)]
    ups = [u * rng.uniform(0.5, 2.0) for u in ups]
    return [u / np.linalg.norm(u) for u in ups] if unit else ups


# ------------------------------------------------------------------ FedAvg / FedProx / PCR

def test_fedavg_is_example_weighted_mean():
    a, b = np.array([1.0, 0.0, 2.0]), np.array([-1.0, 4.0, 0.0])
    np.testing.assert_allclose(fedavg([a, b], [3, 1]), (3 * a + b) / 4)
    res = make_aggregator("fedavg").aggregate([a, b], [3, 1], AggState())
    np.testing.assert_allclose(res.delta, (3 * a + b) / 4)
    assert res.conflict is None and res.info["weights"] == [0.75, 0.25]
    # a client with zero examples gets zero weight
    np.testing.assert_allclose(fedavg([a, b], [0, 2]), b)


def test_fedprox_server_is_fedavg_and_penalty_gradient():
    a, b = np.array([1.0, 2.0]), np.array([3.0, -2.0])
    res = make_aggregator("fedprox", mu=0.1).aggregate([a, b], [1, 1], AggState())
    np.testing.assert_allclose(res.delta, [2.0, 0.0])
    assert res.info["mu"] == 0.1
    theta = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    g = torch.tensor([0.0, 1.0, 0.5])
    pen = prox_penalty(theta, g, mu=0.3)
    assert pen.item() == pytest.approx(0.15 * (1 + 9 + 0))
    pen.backward()
    torch.testing.assert_close(theta.grad, 0.3 * (theta.detach() - g))
    assert prox_penalty([theta], [g], mu=0.0).item() == 0.0


def test_pcr_penalty_weights_by_conflict():
    theta = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    g = torch.zeros(3)
    c = np.array([0.0, 0.5, 1.0])
    pen = pcr_penalty(theta, g, c, lam=1e-5)
    assert pen.item() == pytest.approx(1e-5 * 1.5)
    pen.backward()
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, 1e-5, 2e-5]))
    assert pcr_penalty(theta, g, None).item() == 0.0


# ------------------------------------------------------------------ TIES

def test_trim_top_and_keep_count():
    d = np.array([0.1, -3.0, 2.0, -0.5, 0.0])
    np.testing.assert_array_equal(trim_top(d, 2), [0, -3.0, 2.0, 0, 0])
    np.testing.assert_array_equal(trim_top(d, 0), np.zeros(5))
    np.testing.assert_array_equal(trim_top(d, 9), d)
    assert keep_count(0.8, 10000) == 8000 and keep_count(0.29, 100) == 29 and keep_count(1.0, 7) == 7


def test_ties_hand_example():
    u1 = np.array([3.0, -1.0, 0.2, 2.0, 0.1])
    u2 = np.array([1.0, 2.0, 0.1, -4.0, 0.3])
    u3 = np.array([2.0, 0.1, -5.0, -1.0, 0.2])
    # density 0.6 -> keep top 3 of 5 per client
    # t1 = [3,-1,0,2,0]; t2 = [1,2,0,-4,0]; t3 = [2,0,-5,-1,0]
    # elected signs: +, +, -, -, 0 ; disjoint means: (3+1+2)/3, 2/1, -5/1, (-4-1)/2, 0
    np.testing.assert_allclose(ties([u1, u2, u3], density=0.6), [2.0, 2.0, -5.0, -2.5, 0.0])


def test_ties_identical_and_opposite():
    d = clustered(1, 100)[0]
    out = ties([d, d, d])
    assert np.count_nonzero(out) == 20
    np.testing.assert_allclose(out, trim_top(d, 20))
    np.testing.assert_array_equal(ties([d, -d]), np.zeros(100))


# ------------------------------------------------------------------ H-TIES

@pytest.mark.parametrize("k", [1, 2, 5])
def test_hties_identical_updates_return_that_update(k):
    d = clustered(1, 500, seed=3, unit=False)[0]
    out = hties([d.copy() for _ in range(k)])
    np.testing.assert_allclose(out.delta, d, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(out.weights, np.full(k, 1 / k))
    np.testing.assert_array_equal(out.retention, np.ones(k))
    np.testing.assert_array_equal(out.conflict, (d == 0).astype(float))  # 0 where all agree
    res = make_aggregator("hties").aggregate([d] * k, [1] * k, AggState())
    np.testing.assert_allclose(res.delta, d, rtol=1e-12, atol=1e-15)


def test_hties_two_opposite_equal_updates_give_zero():
    d = clustered(1, 300, seed=4, unit=False)[0]
    out = hties([d, -d])
    np.testing.assert_array_equal(out.delta, np.zeros(300))
    np.testing.assert_array_equal(out.conflict, np.ones(300))
    np.testing.assert_allclose(out.cosine[0, 1], -1.0)


def test_hties_rho_gate():
    # K = 2: equal weights, equal h -> r = 1; coordinate 0 has mass ratio 1.05, coordinate 1 ratio 1.5
    a = np.array([1.05, 1.5, 1.0, 0.0])
    b = np.array([-1.0, -1.0, 1.0, 0.0])
    out = hties([a, b])  # rho = 1.1
    np.testing.assert_allclose(out.delta, [0.0, 1.5, 1.0, 0.0])
    out = hties([a, b], HTiesParams(rho=1.01))
    np.testing.assert_allclose(out.delta, [1.05, 1.5, 1.0, 0.0])
    out = hties([b, a], HTiesParams(rho=2.0))  # neither side has twice the other's mass
    np.testing.assert_allclose(out.delta, [0.0, 0.0, 1.0, 0.0])
    out = hties([-a, -b])  # negative side wins symmetrically
    np.testing.assert_allclose(out.delta, [0.0, -1.5, -1.0, 0.0])
    # the gate on raw sums: weighted mean over the winning side only
    g = gated_merge(np.array([0.6, 0.5]), np.array([-0.1, -0.5]), np.array([0.3, 0.5]), np.array([0.5, 0.5]), 1.1, 1e-12)
    np.testing.assert_allclose(g, [2.0, 0.0])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("prm", [HTiesParams(), HTiesParams(r0=0.9, delta=5.0), HTiesParams(r0=0.0, delta=0.0)])
def test_hties_invariants_on_heterogeneous_updates(seed, prm):
    ups = clustered(8, 1000, seed=seed, noise=1.5)
    ups[3] = -ups[0]  # a conflicting client
    out = hties(ups, prm)
    assert out.weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(out.weights > 0)
    assert np.all((out.retention >= 0) & (out.retention <= 1))
    assert np.all((out.conflict >= 0) & (out.conflict <= 1))
    assert np.all((out.h >= 0) & (out.h <= 1)) and np.all((out.h_hat >= 0) & (out.h_hat <= 1))
    assert out.h_hat.min() == 0.0 and out.h_hat.max() == pytest.approx(1.0)
    assert np.all(np.isfinite(out.delta))
    # every coordinate of Δ* lies within the range of the client values on the winning side
    x = np.stack(ups)
    assert np.all(out.delta <= x.max(axis=0) + 1e-12) and np.all(out.delta >= x.min(axis=0) - 1e-12)
    # retention really trims: client i keeps floor(r_i P) coordinates
    if prm.r0 == 0.0:
        np.testing.assert_array_equal(out.delta, np.zeros(1000))


def test_hties_details_match_formulas():
    ups = clustered(4, 200, seed=7)
    out = hties(ups)
    s = pairwise_cosine(ups)
    x = np.stack(ups)
    np.testing.assert_allclose(s, x @ x.T / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1)))
    off = s - np.diag(np.diag(s))
    np.testing.assert_allclose(out.h, 1 - np.maximum(off, 0).sum(1) / 3)
    e = np.exp(np.abs(off).sum(1))
    np.testing.assert_allclose(out.weights, e / e.sum())
    np.testing.assert_allclose(out.retention, np.clip(1.0 - 0.2 * minmax(out.h), 0, 1))
    np.testing.assert_allclose(out.conflict, 1 - np.abs(np.sign(x).sum(0)) / 4)
    np.testing.assert_array_equal(minmax(np.array([0.3, 0.3])), [0.0, 0.0])


def test_hties_zero_update_is_ignored_when_nothing_is_trimmed():
    ups = clustered(4, 300, seed=2)
    prm = HTiesParams(delta=0.0)  # no trimming: the zero client only changes nothing
    ref = hties(ups[:3], prm).delta
    out = hties(ups[:3] + [np.zeros(300)], prm)
    np.testing.assert_allclose(out.delta, ref, rtol=1e-10)
    assert out.cosine[3, :3].tolist() == [0.0, 0.0, 0.0]


def test_hties_info_is_json():
    ups = clustered(5, 100)
    res = make_aggregator("hties").aggregate(ups, [1] * 5, AggState())
    info = json.loads(json.dumps(res.info))
    assert len(info["weights"]) == 5 and len(info["retention"]) == 5
    assert 0 <= info["mean_conflict"] <= 1
    assert res.conflict.shape == (100,)
