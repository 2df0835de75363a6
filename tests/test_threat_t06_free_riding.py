"""T06: free-riding against the aggregators the network actually offers (fedavg | sa_hties).

Over the network the server only ever sees secure sums, so it offers FedAvg and SA-H-TIES and
refuses the plaintext rules (H-TIES, TIES). The tests run real rounds on the round engine with a
free rider that submits an all-zero update: every submission is accepted and attributable (the
audit entry names the client and the SHA-256 of exactly what was stored), under SA-H-TIES the zero
update has no influence on the global step, and under FedAvg it dilutes the step by k / (k + 1)
(the residual risk: the free rider is not detected, only accountable).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedproxy_secure.aggregate import AggState, make_aggregator
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.protocol.roundcfg import state_from_bytes
from fedproxy_secure.protocol.settings import FederationSettings, net_aggregators
from tests.threat_helpers import InProcessFederation

DIM = 12


def _honest(k: int, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        u = 0.2 + 0.1 * rng.standard_normal(DIM)
        out.append(u / np.linalg.norm(u) * rng.uniform(0.4, 0.9))
    return out


def _round(tmp_path, aggregator: str, k_honest: int = 4) -> tuple[InProcessFederation, int, str, list, dict]:
    fed = InProcessFederation(tmp_path, n=k_honest + 1, dim=DIM, aggregator=aggregator,
                              **({"sa_hties": {"h_norm": "none"}} if aggregator == "sa_hties" else {}))
    ids = sorted(fed.keys)
    rider = ids[-1]
    honest = _honest(k_honest)
    ups = {c: u for c, u in zip(ids[:-1], honest)}
    ups[rider] = np.zeros(DIM)
    rid = fed.run_round(ups)
    assert fed.store.get_round(rid).status == "done", fed.store.get_round(rid).reason
    return fed, rid, rider, honest, ups


@pytest.mark.parametrize("rule", ["hties", "ties", "fedprox", "median"])
def test_network_offers_only_secure_sum_aggregators(rule):
    assert net_aggregators() == ("fedavg", "sa_hties")
    with pytest.raises(ConfigError, match="federation.aggregator"):
        FederationSettings.from_dict({"aggregator": rule})


def test_sa_hties_limits_a_zero_update_s_influence(tmp_path):
    """The network round equals the in-process SA-H-TIES over all five updates; the zero update adds
    nothing to the merged direction (it only shifts the conflict statistic of gated coordinates), so
    it moves the step far less than under FedAvg, where it scales the whole step by k / (k + 1)."""
    fed, rid, rider, honest, ups = _round(tmp_path, "sa_hties")
    theta = state_from_bytes(fed.store.global_state()[1])["theta"]
    agg = make_aggregator("sa_hties", h_norm="none")
    with_rider = agg.aggregate([ups[c] for c in sorted(ups)], [1] * len(ups), AggState()).delta
    np.testing.assert_allclose(theta, with_rider, rtol=1e-6, atol=1e-8)
    without = agg.aggregate(honest, [1] * len(honest), AggState()).delta
    sa_shift = np.linalg.norm(theta - without) / np.linalg.norm(without)
    fedavg_shift = 1 / (len(honest) + 1)  # ||sum/(k+1) - sum/k|| / ||sum/k||
    assert sa_shift < 0.5 * fedavg_shift, (sa_shift, fedavg_shift)
    assert np.linalg.norm(theta) > 0.1  # a real step


def test_fedavg_free_rider_dilutes_but_is_attributable(tmp_path):
    fed, rid, rider, honest, ups = _round(tmp_path, "fedavg")
    theta = state_from_bytes(fed.store.global_state()[1])["theta"]
    k = len(honest)
    np.testing.assert_allclose(theta, sum(honest) / (k + 1), atol=1e-6)  # residual: diluted by k/(k+1)
    accepts = [e["data"] for e in fed.audit_events() if e["event"] == "accept" and e["data"]["round"] == rid]
    stages = fed.eng.round_stages()
    for c in fed.keys:  # one attributable entry per client and stage, hash of exactly what was stored
        for stage in ("join",) + tuple(stages):
            mine = [a for a in accepts if a["client"] == c and a["stage"] == stage]
            assert len(mine) == 1, (c, stage)
            stored = fed.store.submissions(rid, stage)[c]
            assert mine[0]["sha256"] == hashlib.sha256(stored).hexdigest()
    assert any(a["client"] == rider and a["stage"] == "masked_input" for a in accepts)
