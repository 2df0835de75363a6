"""Bad input to every aggregator: a defined result or a clear DataError/ConfigError."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedproxy_secure.aggregate import AGGREGATOR_NAMES, AggState, check_updates, flatten_named, make_aggregator
from fedproxy_secure.aggregate.validate import check_num_examples
from fedproxy_secure.errors import ConfigError, DataError


def _ups(k=3, p=20, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=p) for _ in range(k)]


def test_empty_list_rejected():
    with pytest.raises(DataError, match="empty"):
        check_updates([])


def test_length_mismatch_names_client():
    ups = _ups()
    ups[2] = ups[2][:-1]
    with pytest.raises(DataError, match=r"client 2: .*length 19 .*length 20"):
        check_updates(ups)
    with pytest.raises(DataError, match=r"client 2 \('carol'\)"):
        check_updates(ups, names=["alice", "bob", "carol"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected_with_position(bad):
    ups = _ups()
    ups[1][7] = bad
    with pytest.raises(DataError, match=r"client 1: .*1 non-finite .*coordinate 7"):
        check_updates(ups)


def test_shape_and_empty_vector_rejected():
    with pytest.raises(DataError, match="client 0: update has shape"):
        check_updates([np.zeros((2, 3))])
    with pytest.raises(DataError, match="client 0: update is an empty vector"):
        check_updates([np.zeros(0)])
    with pytest.raises(DataError, match="complex"):
        check_updates([np.ones(3, dtype=complex)])


def test_names_must_match_and_be_unique():
    with pytest.raises(DataError, match="3 updates but 2 client names"):
        check_updates(_ups(), names=["a", "b"])
    with pytest.raises(DataError, match="'a' is used by clients 0 and 2"):
        check_updates(_ups(), names=["a", "b", "a"])


def test_check_updates_copies_and_accepts_torch():
    torch = pytest.importorskip("torch")
    a = np.arange(4.0)
    out = check_updates([a, torch.arange(4, dtype=torch.float32)])
    out[0][0] = 99.0
    assert a[0] == 0.0 and out[1].dtype == np.float64
    np.testing.assert_array_equal(out[1], np.arange(4.0))


def test_flatten_named_checks_parameter_names_and_shapes():
    a = {"l0.B": np.ones((2, 3)), "l1.B": np.zeros(4)}
    vecs, layout = flatten_named([a, {"l1.B": np.ones(4), "l0.B": np.full((2, 3), 2.0)}])
    assert layout == [("l0.B", (2, 3)), ("l1.B", (4,))]
    np.testing.assert_array_equal(vecs[1], np.r_[np.full(6, 2.0), np.ones(4)])
    with pytest.raises(DataError, match=r"client 1: parameter names differ .*missing \['l1.B'\].*extra \['l2.B'\]"):
        flatten_named([a, {"l0.B": np.ones((2, 3)), "l2.B": np.ones(4)}])
    with pytest.raises(DataError, match=r"client 1: parameter 'l0.B' has shape \(3, 2\)"):
        flatten_named([a, {"l0.B": np.ones((3, 2)), "l1.B": np.ones(4)}])
    with pytest.raises(DataError, match=r"client 1: .*non-finite"):
        flatten_named([a, {"l0.B": np.ones((2, 3)), "l1.B": np.array([0, np.nan, 0, 0])}])


def test_num_examples_checked():
    with pytest.raises(DataError, match="3 updates but 2 example counts"):
        check_num_examples([1, 2], 3, need_positive_total=False)
    with pytest.raises(DataError, match="client 1: num_examples = -1"):
        check_num_examples([1, -1, 2], 3, need_positive_total=False)
    with pytest.raises(DataError, match="every client reports num_examples = 0"):
        check_num_examples([0, 0], 2, need_positive_total=True)


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
def test_every_aggregator_rejects_bad_input(name):
    agg = make_aggregator(name)
    with pytest.raises(DataError):
        agg.aggregate([], [], AggState())
    ups = _ups()
    ups[0] = np.r_[ups[0], 1.0]
    with pytest.raises(DataError, match="length"):
        agg.aggregate(ups, [1, 1, 1], AggState())
    ups = _ups()
    ups[2][0] = np.nan
    with pytest.raises(DataError, match="client 2"):
        agg.aggregate(ups, [1, 1, 1], AggState())
    with pytest.raises(DataError, match="example counts"):
        agg.aggregate(_ups(), [1, 1], AggState())


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
def test_every_aggregator_zero_vectors_and_single_client(name):
    agg = make_aggregator(name)
    p = 30
    # all-zero updates: a zero step, finite conflict (1 everywhere for H-TIES: no sign agreement)
    res = agg.aggregate([np.zeros(p)] * 3, [1, 1, 1], AggState())
    np.testing.assert_array_equal(res.delta, np.zeros(p))
    if res.conflict is not None:
        np.testing.assert_array_equal(res.conflict, np.ones(p))
    json.dumps(res.info)
    # one zero update among others: finite result, listed for H-TIES variants
    ups = _ups(3, p)
    ups[1] = np.zeros(p)
    res = agg.aggregate(ups, [1, 1, 1], AggState())
    assert np.all(np.isfinite(res.delta))
    if "zero_update_clients" in res.info:
        assert res.info["zero_update_clients"] == [1]
    # a single client: its own update (TIES: trimmed to its top 20%)
    d = _ups(1, p)[0]
    res = agg.aggregate([d], [5], AggState())
    if name == "ties":
        keep = np.argsort(-np.abs(d))[:6]
        np.testing.assert_allclose(res.delta[keep], d[keep])
        assert np.count_nonzero(res.delta) == 6
    else:
        np.testing.assert_allclose(res.delta, d, rtol=1e-12, atol=1e-15)
    if res.conflict is not None:
        np.testing.assert_array_equal(res.conflict, np.zeros(p))
    json.dumps(res.info)


def test_registry_errors():
    with pytest.raises(ConfigError, match="aggregator.name = 'fedsgd' is unknown"):
        make_aggregator("fedsgd")
    with pytest.raises(ConfigError, match=r"\['density'\] not accepted by 'hties'"):
        make_aggregator("hties", density=0.3)
    with pytest.raises(ConfigError, match="aggregator.rho"):
        make_aggregator("hties", rho=0.5)
    with pytest.raises(ConfigError, match="aggregator.h_norm"):
        make_aggregator("sa_hties", h_norm="maybe")
    with pytest.raises(ConfigError, match="aggregator.density"):
        make_aggregator("ties", density=0.0)
    with pytest.raises(ConfigError, match="aggregator.mu"):
        make_aggregator("fedprox", mu=-1.0)
    for n in AGGREGATOR_NAMES:
        a = make_aggregator(n)
        assert a.name == n
        assert a.needs_individual_updates == (n in ("ties", "hties"))
