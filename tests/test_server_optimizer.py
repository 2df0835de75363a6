"""The server's global step: the optimizer math, the lr schedule, and one behaviour in every engine.

``simulate`` (through :class:`~fedproxy_secure.pipelines.round_driver.GlobalStepper`) and the network
round engine (``server/rounds.py``, here in memory with real client stage machines and signed round
configs) must move θ identically over several rounds, with and without a stateful server optimizer,
for FedAvg and SA-H-TIES over masking -- including across an engine restart between rounds (the
optimizer's moments are stored with the round, not kept in memory).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedproxy_secure.aggregate import AggState
from fedproxy_secure.aggregate.server_opt import (
    ServerOptimizerConfig, global_step, initial_state, scheduled_lr, state_arrays, state_from_arrays,
)
from fedproxy_secure.config import parse_run_config
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.pipelines.inmemory import InMemoryFederation
from fedproxy_secure.pipelines.round_driver import GlobalStepper, client_round_fields, run_aggregator
from fedproxy_secure.pipelines.simulate import _secure_sum_fn
from fedproxy_secure.protocol.settings import FederationSettings
from fedproxy_secure.server.rounds import RoundEngine

DIM, N, CLIP, ROUNDS = 10, 4, 1.0, 3


# ------------------------------------------------------------------ the math
def test_sgd_at_lr_one_is_plain_fedavg_exactly() -> None:
    rng = np.random.default_rng(0)
    theta, delta = rng.standard_normal(DIM), rng.standard_normal(DIM)
    new, st, info = global_step(theta, delta, None, ServerOptimizerConfig(), 0, 5)
    assert np.array_equal(new, theta + delta) and info["server_lr"] == 1.0


def test_avgm_accumulates_momentum_and_adam_normalises() -> None:
    d1, d2 = np.full(3, 0.5), np.full(3, -0.25)
    avgm = ServerOptimizerConfig(name="avgm", lr=2.0, beta1=0.5)
    t1, s1, _ = global_step(np.zeros(3), d1, None, avgm, 0, 2)
    t2, s2, _ = global_step(t1, d2, s1, avgm, 1, 2)
    np.testing.assert_allclose(t1, 2.0 * d1)
    np.testing.assert_allclose(t2, t1 + 2.0 * (0.5 * d1 + d2))  # m = β m + Δ
    adam = ServerOptimizerConfig(name="adam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    delta = np.array([1e-4, 1.0, -100.0])
    t, s, _ = global_step(np.zeros(3), delta, None, adam, 0, 1)
    m, v = 0.1 * delta, 0.01 * delta**2
    np.testing.assert_allclose(t, 0.1 * m / (np.sqrt(v) + 1e-3))
    assert abs(t[1]) == pytest.approx(abs(t[2]), rel=2e-2)  # per-coordinate normalisation: steps nearly scale-free (τ aside)


def test_yogi_second_moment_moves_additively() -> None:
    yogi = ServerOptimizerConfig(name="yogi", lr=0.1, beta2=0.9)
    st = initial_state(2) | {"v": np.array([4.0, 0.0])}
    _, new, _ = global_step(np.zeros(2), np.array([1.0, 1.0]), st, yogi, 0, 1)
    np.testing.assert_allclose(new["v"], [4.0 - 0.1 * 1.0, 0.0 + 0.1 * 1.0])


def test_global_step_is_pure_and_refuses_bad_aggregates() -> None:
    cfg = ServerOptimizerConfig(name="adam", lr=0.1)
    theta, delta = np.ones(DIM), np.full(DIM, 0.5)
    st = initial_state(DIM)
    before = {k: v.copy() for k, v in st.items()}
    global_step(theta, delta, st, cfg, 0, 3)
    assert all(np.array_equal(st[k], before[k]) for k in st) and np.array_equal(theta, np.ones(DIM))
    with pytest.raises(ValueError, match="NaN"):
        global_step(theta, np.full(DIM, np.nan), None, cfg, 0, 3)
    with pytest.raises(ValueError, match="shape"):
        global_step(theta, np.ones(DIM + 1), None, cfg, 0, 3)
    restored = state_from_arrays(state_arrays(st))
    assert set(restored) == {"m", "v", "step"} and state_from_arrays({"theta": theta}) is None


def test_cosine_schedule_runs_from_lr_to_the_floor() -> None:
    lrs = [scheduled_lr(1e-2, "cosine", r, 5, 0.1) for r in range(5)]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[2] == pytest.approx(1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert scheduled_lr(1e-2, "constant", 3, 5) == 1e-2


def test_bad_optimizer_settings_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"aggregator.server_optimizer.name"):
        parse_run_config(_cfg_dict("fedavg", "none", {"name": "lamb"}))
    with pytest.raises(ConfigError, match=r"federation.server_optimizer.lr"):
        FederationSettings.from_dict({"rounds": 1, "min_clients": N, "threshold": 3, "dim": DIM,
                                      "server_optimizer": {"name": "adam", "lr": -1}})


# ------------------------------------------------------------------ simulate = network engine
def _cfg_dict(aggregator: str, mode: str, opt: dict | None) -> dict:
    return {"model": {"tiny": {"arch": "llama", "layers": 2, "hidden": 16, "heads": 2, "intermediate": 32,
                               "vocab": 259, "max_positions": 64}},
            "data": {"dir": "examples/data/bigbench-mini", "tasks": ["navigate"]}, "rounds": ROUNDS,
            "clients": {"count": N}, "train": {"update_clip_norm": CLIP, "lr": 1e-2, "lr_schedule": "cosine"},
            "aggregator": {"name": aggregator, "server_optimizer": opt or {"name": "sgd"}},
            "secagg": {"mode": mode, "threshold": 3}}


def _round_updates(r: int) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + r)
    out = []
    for i in range(N):
        u = rng.standard_normal(DIM) + (0.8 if i % 2 else -0.4)
        out.append(u / np.linalg.norm(u) * rng.uniform(0.3, 0.9) * CLIP)
    return out


def _simulate_thetas(aggregator: str, opt: dict | None) -> list[np.ndarray]:
    """simulate.federate's aggregation and global step, round after round, on fixed updates (no training)."""
    cfg = parse_run_config(_cfg_dict(aggregator, "masking", opt))
    stepper, theta, state, out = GlobalStepper(cfg), np.zeros(DIM), AggState(round=0), []
    for r in range(ROUNDS):
        agg = run_aggregator(cfg, _secure_sum_fn(cfg, list(range(N)), set(), r, {}))
        res = agg.aggregate([u / CLIP for u in _round_updates(r)], [16] * N, state)
        theta, _ = stepper.step(theta, CLIP * res.delta, r)
        state = AggState(round=r + 1, conflict=res.conflict)
        out.append(theta)
    return out


def _network_thetas(tmp_path, aggregator: str, opt: dict | None, restart_after: int | None = None) -> list[np.ndarray]:
    s = FederationSettings.from_dict({"rounds": ROUNDS, "min_clients": N, "threshold": 3, "mode": "masking",
                                      "dim": DIM, "clip_norm": CLIP, "aggregator": aggregator,
                                      "train": {"lr": 1e-2, "lr_schedule": "cosine"},
                                      **({"server_optimizer": opt} if opt else {})})
    fed = InMemoryFederation(tmp_path, s, n=N)
    out = []
    for r in range(ROUNDS):
        got = fed.run_round(dict(zip(fed.clients, _round_updates(r))))
        assert got.row.status == "done", got.row.reason
        sim_lr = parse_run_config(_cfg_dict(aggregator, "masking", opt)).train.lr_for_round(r, ROUNDS)
        assert got.row.config["train"]["lr"] == pytest.approx(sim_lr)  # the signed config carries the scheduled lr
        out.append(got.theta)
        if restart_after == r:  # a new engine over the same store: nothing held in memory survives
            fed.engine = RoundEngine(fed.store, fed.audit, s, clock=fed.clock, signer=fed.engine.signer)
            fed.engine.recover()
    return out


@pytest.mark.parametrize("aggregator", ["fedavg", "sa_hties"])
@pytest.mark.parametrize("opt", [None, {"name": "avgm", "lr": 1.5, "beta1": 0.8},
                                 {"name": "adam", "lr": 0.05, "schedule": "cosine", "min_lr_ratio": 0.2}])
def test_simulate_equals_network_engine_over_rounds(tmp_path, aggregator: str, opt: dict | None) -> None:
    sim = _simulate_thetas(aggregator, opt)
    net = _network_thetas(tmp_path, aggregator, opt, restart_after=0 if opt else None)
    assert np.linalg.norm(sim[-1]) > 0.01
    for r, (a, b) in enumerate(zip(sim, net)):
        np.testing.assert_allclose(b, a, atol=1e-6, err_msg=f"round {r + 1}")
    if opt:  # the optimizer changes the trajectory (the test would pass vacuously otherwise)
        plain = _simulate_thetas(aggregator, None)
        assert np.linalg.norm(plain[-1] - sim[-1]) > 1e-3


def test_client_round_fields_carry_the_scheduled_lr() -> None:
    cfg = parse_run_config(_cfg_dict("fedavg", "none", None))
    lrs = [client_round_fields(cfg, r)["lr"] for r in range(ROUNDS)]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3) and lrs[1] < lrs[0]  # floor: 0.1 lr
