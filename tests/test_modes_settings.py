"""FederationSettings (protocol/settings.py): pydantic-validated, every refusal names the field."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from fedproxy_secure.errors import ConfigError
from fedproxy_secure.protocol.names import DEFAULT_DEADLINES
from fedproxy_secure.protocol.settings import FederationSettings
from fedproxy_secure.wire.threshold import effective_threshold


@pytest.mark.parametrize("bad,needle", [
    ({"rounds": 0}, "federation.rounds=0"),
    ({"threshold": "two"}, "federation.threshold = 'two'"),
    ({"clip_norm": "x" * 500}, "federation.clip_norm = 'xxxx"),
    ({"on_restart": "later"}, "federation.on_restart = 'later'"),
    ({"deadlines": {"join": "soon"}}, "federation.deadlines.join"),
    ({"mode": "rot13"}, "federation.mode='rot13'"),
    ({"aggregator": "ties"}, "federation.aggregator='ties'"),
    ({"he": {"flood": False}}, "federation.he is set but federation.mode is 'masking'"),
    ({"mode": "he", "he": {"flood": False}}, "federation.he.flood"),
    ({"aggregator": "sa_hties", "sa_hties": {"rho": 0.5}}, "federation.sa_hties.rho"),
    ({"aggregator": "sa_hties", "mode": "he"}, "sa_hties with federation.mode='he'"),
    ({"a_seed": -1}, "federation.a_seed=-1"),
    ({"bogus": 1}, "unknown keys ['bogus']"),
    ({"weighting": "by_size"}, "federation.weighting = 'by_size'"),
    ({"weighting": "examples", "max_examples": 0}, "federation.max_examples=0"),
    ({"aggregator": "sa_hties", "weighting": "examples"}, "federation.weighting='examples': SA-H-TIES"),
])
def test_refusals_name_the_field(bad: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        FederationSettings.from_dict(bad)
    assert needle in str(exc.value)
    assert len(str(exc.value)) < 400  # the offending value is shown capped, never whole


def test_defaults_roundtrip_through_asdict() -> None:
    s = FederationSettings.from_dict({"mode": "he", "rounds": 2, "deadlines": {"he_keys": 5}})
    d = asdict(s)
    assert d["deadlines"] == {**DEFAULT_DEADLINES, "he_keys": 5.0}
    assert FederationSettings.from_dict(d) == s
    s.a_seed = 7  # server/setup.py fixes a legacy folder's seed in place
    assert asdict(s)["a_seed"] == 7


@pytest.mark.parametrize("mode,n,req,agg,want", [
    ("masking", 9, 2, "fedavg", 5), ("masking", 4, None, "fedavg", 3), ("he", 5, 1, "fedavg", 2),
    ("plain", 5, 1, "fedavg", 1), ("none", 6, None, "fedavg", 4), ("masking", 4, 2, "sa_hties", 3),
    ("plain", 4, 2, "sa_hties", 3), ("masking", 3, 3, "fedavg", 3),
])
def test_the_one_threshold_rule(mode: str, n: int, req, agg: str, want: int) -> None:
    assert effective_threshold(mode, n, req, agg) == want
