"""The networked round engine (run in memory: same engine, same stage machines, same signed configs,
no HTTP) and the in-process path ``simulate`` uses (``secagg.make_summer`` + ``aggregate``) give the
same global update on the same inputs, for plain/masking/HE FedAvg and SA-H-TIES over masking.

The loopback network tests (tests/test_net_*.py) check the HTTP path against the same math.
FedAvg uses equal example counts here: the network FedAvg is the unweighted mean over survivors.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedproxy_secure.aggregate import AggState, make_aggregator
from fedproxy_secure.pipelines.inmemory import InMemoryFederation
from fedproxy_secure.protocol.settings import FederationSettings
from fedproxy_secure.secagg import make_summer

DIM, CLIP = 10, 1.0


def _updates(clients: list[str], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i, c in enumerate(clients):
        u = rng.standard_normal(DIM) + (1.0 if i % 2 else -0.5)
        out[c] = u / np.linalg.norm(u) * rng.uniform(0.3, 0.9) * CLIP
    return out


def _inprocess(mode: str, aggregator: str, ups: list[np.ndarray], t: int, **hparams) -> np.ndarray:
    """What simulate computes for one round: updates / clip, secure sums in-process, step x clip."""
    summer = make_summer("plain" if mode == "plain" else mode)
    phase = [0]

    def secure_sum(vectors):
        phase[0] += 1
        res = summer.secure_sum({i + 1: v for i, v in enumerate(vectors)}, threshold=t,
                                session_id=bytes([phase[0]]) * 32)
        return res.total

    agg = make_aggregator(aggregator, secure_sum=secure_sum, **hparams)
    res = agg.aggregate([u / CLIP for u in ups], [10] * len(ups), AggState(round=0))
    return CLIP * res.delta


@pytest.mark.parametrize("mode,tol", [("plain", 1e-12), ("masking", 1e-6), ("he", 1e-3)])
def test_fedavg_engine_equals_inprocess(tmp_path, mode: str, tol: float) -> None:
    s = FederationSettings.from_dict({"rounds": 1, "min_clients": 3, "threshold": 2, "mode": mode, "dim": DIM,
                                      "clip_norm": CLIP})
    fed = InMemoryFederation(tmp_path, s, n=3)
    ups = _updates(fed.clients, seed=3)
    out = fed.run_round(ups)
    assert out.row.status == "done", out.row.reason
    expect = _inprocess(mode, "fedavg", [ups[c] for c in fed.clients], t=2)
    np.testing.assert_allclose(out.theta, expect, atol=tol)
    assert np.linalg.norm(expect) > 0.05  # not trivially zero


def test_sa_hties_engine_equals_inprocess_aggregator(tmp_path) -> None:
    s = FederationSettings.from_dict({"rounds": 1, "min_clients": 4, "threshold": 3, "mode": "masking", "dim": DIM,
                                      "clip_norm": CLIP, "aggregator": "sa_hties",
                                      "sa_hties": {"h_norm": "reveal", "r0": 1.0, "delta": 0.2, "rho": 1.1}})
    fed = InMemoryFederation(tmp_path, s, n=4)
    ups = _updates(fed.clients, seed=4)
    out = fed.run_round(ups)
    assert out.row.status == "done", out.row.reason
    expect = _inprocess("masking", "sa_hties", [ups[c] for c in fed.clients], t=3, r0=1.0, delta=0.2, rho=1.1)
    np.testing.assert_allclose(out.theta, expect, atol=1e-5)
    assert out.conflict is not None and out.conflict.shape == (DIM,)
    assert np.linalg.norm(expect) > 0.01


@pytest.mark.parametrize("mode,tol", [("plain", 1e-12), ("masking", 1e-6), ("he", 1e-3)])
def test_example_weighted_fedavg_over_the_network_equals_inprocess_fedavg(tmp_path, mode: str, tol: float) -> None:
    """``federation.weighting: examples``: clients pre-multiply by their (capped) example share and
    also secure-sum it; the step equals in-process FedAvg weighted by examples."""
    from fedproxy_secure.aggregate.fedavg import fedavg

    s = FederationSettings.from_dict({"rounds": 1, "min_clients": 3, "threshold": 2, "mode": mode, "dim": DIM,
                                      "clip_norm": CLIP, "weighting": "examples", "max_examples": 200})
    fed = InMemoryFederation(tmp_path, s, n=3)
    ups = _updates(fed.clients, seed=7)
    counts = dict(zip(fed.clients, [5, 120, 40]))
    out = fed.run_round(ups, num_examples=counts)
    assert out.row.status == "done", out.row.reason
    assert out.row.config["weighting"] == {"by": "examples", "max_examples": 200}
    expect = fedavg([ups[c] for c in fed.clients], [counts[c] for c in fed.clients])
    np.testing.assert_allclose(out.theta, expect, atol=tol)
    assert np.max(np.abs(expect - np.mean([ups[c] for c in fed.clients], axis=0))) > 10 * tol  # weights matter
    assert out.row.result["weight_sum"] == pytest.approx(165 / 200, abs=max(tol, 1e-9))


def test_example_weighted_round_refuses_a_client_without_a_count(tmp_path) -> None:
    s = FederationSettings.from_dict({"rounds": 1, "min_clients": 3, "threshold": 2, "mode": "masking", "dim": DIM,
                                      "weighting": "examples"})
    fed = InMemoryFederation(tmp_path, s, n=3)
    with pytest.raises(Exception, match="num_examples"):
        fed.run_round(_updates(fed.clients, seed=8))
