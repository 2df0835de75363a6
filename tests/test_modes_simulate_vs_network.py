"""``simulate`` and the networked round engine give the same global update on the same inputs.

simulate's aggregation path (``pipelines.simulate._secure_sum_fn`` + ``round_driver.run_aggregator``, whose secure
sums run the network's stage machines through ``pipelines.stage_sum.StageMachineSummer``) against one
round of the real :class:`RoundEngine` with the real client stage machines, signed round configs and
the canonical-JSON wire form (``pipelines.inmemory``: everything of a network round but HTTP, which
tests/test_net_*.py cover). Same seed, same updates: FedAvg over plain, masking and HE (equal counts,
and unequal counts with ``federation.weighting: examples``), and SA-H-TIES over masking.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedproxy_secure.aggregate import AggState
from fedproxy_secure.config import parse_run_config
from fedproxy_secure.pipelines.inmemory import InMemoryFederation
from fedproxy_secure.pipelines.round_driver import run_aggregator
from fedproxy_secure.pipelines.simulate import _secure_sum_fn
from fedproxy_secure.protocol.settings import FederationSettings

DIM, N, CLIP = 10, 4, 1.0


def _updates(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(N):
        u = rng.standard_normal(DIM) + (0.8 if i % 2 else -0.4)
        out.append(u / np.linalg.norm(u) * rng.uniform(0.3, 0.9) * CLIP)
    return out


def _simulate_step(mode: str, aggregator: str, ups: list[np.ndarray], threshold: int,
                   counts: list[int] | None = None) -> np.ndarray:
    """One round of simulate's aggregation (the code in pipelines/simulate.federate), no training."""
    cfg = parse_run_config({"model": {"tiny": {"arch": "llama", "layers": 2, "hidden": 16, "heads": 2,
                                               "intermediate": 32, "vocab": 259, "max_positions": 64}},
                            "data": {"dir": "examples/data/bigbench-mini", "tasks": ["navigate"]},
                            "clients": {"count": N}, "train": {"update_clip_norm": CLIP},
                            "aggregator": {"name": aggregator},
                            "secagg": {"mode": "none" if mode == "plain" else mode, "threshold": threshold}})
    record: dict = {}
    agg = run_aggregator(cfg, _secure_sum_fn(cfg, list(range(N)), set(), 0, record))
    res = agg.aggregate([u / CLIP for u in ups], counts or [16] * N, AggState(round=0))
    assert all(s["mode"] == ("plain" if mode == "plain" else mode) for s in record["secure_sum"])
    return CLIP * res.delta  # the global step at the default server optimizer (sgd, lr 1): θ + Δ


def _network_step(tmp_path, mode: str, aggregator: str, ups: list[np.ndarray], threshold: int,
                  counts: list[int] | None = None) -> np.ndarray:
    extra = {"weighting": "examples", "max_examples": 100} if counts else {}
    s = FederationSettings.from_dict({"rounds": 1, "min_clients": N, "threshold": threshold, "mode": mode,
                                      "dim": DIM, "clip_norm": CLIP, "aggregator": aggregator, **extra})
    fed = InMemoryFederation(tmp_path, s, n=N)
    out = fed.run_round(dict(zip(fed.clients, ups)), num_examples=dict(zip(fed.clients, counts)) if counts else None)
    assert out.row.status == "done", out.row.reason
    assert len(out.row.result["survivors"]) == N
    return out.theta


@pytest.mark.parametrize("mode,aggregator,tol", [("plain", "fedavg", 1e-12), ("masking", "fedavg", 1e-8),
                                                 ("he", "fedavg", 1e-3), ("masking", "sa_hties", 1e-6)])
def test_simulate_equals_network_engine(tmp_path, mode: str, aggregator: str, tol: float) -> None:
    ups = _updates(seed=11)
    t = 3
    sim = _simulate_step(mode, aggregator, ups, t)
    net = _network_step(tmp_path, mode, aggregator, ups, t)
    assert np.linalg.norm(sim) > 0.01
    np.testing.assert_allclose(net, sim, atol=tol)


@pytest.mark.parametrize("mode,tol", [("plain", 1e-12), ("masking", 1e-7), ("he", 1e-3)])
def test_simulate_equals_network_engine_weighted_by_examples(tmp_path, mode: str, tol: float) -> None:
    """Unequal example counts: simulate's FedAvg weights by examples, and so does the network with
    ``federation.weighting: examples``."""
    ups, counts = _updates(seed=12), [16, 90, 7, 40]
    sim = _simulate_step(mode, "fedavg", ups, 3, counts)
    net = _network_step(tmp_path, mode, "fedavg", ups, 3, counts)
    np.testing.assert_allclose(net, sim, atol=tol)
    assert np.max(np.abs(sim - np.mean(ups, axis=0))) > 10 * tol  # the weights matter


@pytest.mark.parametrize("mode,tol", [("plain", 0.0), ("masking", 0.0), ("he", 1e-3)])
def test_stage_machine_summer_matches_the_inprocess_summer_with_dropouts(mode: str, tol: float) -> None:
    """simulate's summer (network stage machines) vs the in-process secagg summer, one client dropped
    before its input (its pairwise masks recovered): same survivors, same sum."""
    from fedproxy_secure.pipelines.stage_sum import StageMachineSummer
    from fedproxy_secure.secagg import DropoutPlan, make_summer

    rng = np.random.default_rng(5)
    vecs = {i: np.clip(0.3 * rng.standard_normal(DIM), -1, 1) for i in range(1, 6)}
    plan = DropoutPlan({"masked_input": frozenset({3})})
    a = StageMachineSummer(mode).secure_sum(vecs, threshold=3, session_id=b"s" * 32, dropouts=plan)
    b = make_summer(mode).secure_sum(vecs, threshold=3, session_id=b"s" * 32, dropouts=plan)
    assert a.survivors == b.survivors == (1, 2, 4, 5)
    assert np.max(np.abs(a.total - b.total)) <= tol
    np.testing.assert_allclose(a.total, sum(vecs[i] for i in (1, 2, 4, 5)), atol=max(tol, 1e-8))
    with pytest.raises(Exception, match="threshold"):
        StageMachineSummer(mode).secure_sum(vecs, threshold=5, session_id=b"t" * 32, dropouts=plan)
