"""T04: the server refuses an aggregate whose norm exceeds cohort x clip norm (model poisoning by
an unclipped update), over the real round engine, in masking mode (plain mode refuses the single
unclipped update before any sum is formed).

Honest clients clip to ``clip_norm``, so the sum of k survivors has norm <= k x clip_norm. A
malicious client skips the clip: under masking every element must still lie in [-clip, clip] (the
encoder refuses more), but the vector's L2 norm can reach sqrt(dim) x clip. The server sees only
the sum and must refuse it; the global state must stay as it was.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedproxy_secure.protocol.roundcfg import state_from_bytes
from tests.threat_helpers import InProcessFederation

DIM, CLIP = 8, 1.0


def _updates(fed: InProcessFederation, poison: bool) -> dict:
    honest = np.full(DIM, 0.5 / np.sqrt(DIM))  # norm 0.5 each, aligned with the attacker's
    ids = sorted(fed.keys)
    ups = {c: honest.copy() for c in ids}
    if poison:
        ups[ids[0]] = np.full(DIM, 0.99 * CLIP)  # every element in range, norm 0.99 x sqrt(8) = 2.8 > clip
    return ups


@pytest.mark.parametrize("mode,needle", [("masking", "aggregate norm"),
                                         # plain: the server sees each update and refuses it first
                                         ("plain", "update norm exceeds the clip norm")])
def test_aggregate_above_cohort_times_clip_is_refused(tmp_path, mode, needle):
    fed = InProcessFederation(tmp_path, n=3, mode=mode, dim=DIM, clip_norm=CLIP)
    before = fed.store.global_state()
    ups = _updates(fed, poison=True)
    total = sum(ups.values())
    assert np.linalg.norm(total) > 3 * CLIP  # the bound the server must enforce is really broken
    rid = fed.run_round(ups)
    row = fed.store.get_round(rid)
    assert row.status == "aborted", row.reason
    assert needle in row.reason and "clip norm" in row.reason
    after = fed.store.global_state()
    assert after[0] == before[0] and after[1] == before[1]  # the global state is untouched
    aborts = [e for e in fed.audit_events() if e["event"] == "round_abort"]
    assert aborts and needle in str(aborts[-1]["data"])
    assert not any(e["event"] == "round_close" for e in fed.audit_events())


@pytest.mark.parametrize("mode", ["masking", "plain"])
def test_clipped_cohort_at_the_bound_is_accepted(tmp_path, mode):
    """Control: the same round with every update clipped closes and moves the state by the mean."""
    fed = InProcessFederation(tmp_path, n=3, mode=mode, dim=DIM, clip_norm=CLIP)
    ups = _updates(fed, poison=False)
    ups[sorted(fed.keys)[0]] = np.full(DIM, CLIP / np.sqrt(DIM))  # exactly at the clip norm
    rid = fed.run_round(ups)
    row = fed.store.get_round(rid)
    assert row.status == "done", row.reason
    theta = state_from_bytes(fed.store.global_state()[1])["theta"]
    np.testing.assert_allclose(theta, sum(ups.values()) / 3, atol=1e-6)
