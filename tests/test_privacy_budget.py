"""DP-SGD rounds: ε per round from the PRV accountant, on-disk budget, refusal past the total."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client_helpers import pairs, tiny_peft, tok
from fedproxy_secure.client.trainer import ClientRoundSpec, train_round
from fedproxy_secure.config import DPConfig
from fedproxy_secure.errors import ConfigError, PrivacyBudgetExceeded
from fedproxy_secure.lora import get_lora_vector
from fedproxy_secure.privacy import PrivacyBudget, clip_l2, epsilon_spent, noise_multiplier_for

DP = DPConfig(enabled=True, epsilon=8.0, delta=1e-5, max_grad_norm=1.0)


def dp_spec(model, round_id: int, **kw) -> ClientRoundSpec:
    base = dict(round_id=round_id, a_seed=7, theta_global=get_lora_vector(model), conflict=None, pcr_lambda=1e-5,
                lr=1e-2, local_steps=4, batch_size=4, max_length=64, clip_norm=1.0, dp=DP, planned_rounds=3)
    base.update(kw)
    return ClientRoundSpec(**base)


def test_noise_multiplier_meets_target() -> None:
    sigma = noise_multiplier_for(8.0, 1e-5, 4 / 12, 12)  # the plan of the 3-round test (cached)
    eps = epsilon_spent([(sigma, 4 / 12, 12)], 1e-5)
    assert 7.5 < eps <= 8.0
    assert epsilon_spent([(sigma * 0.8, 4 / 12, 12)], 1e-5) > 8.0  # less noise would overspend
    assert epsilon_spent([], 1e-5) == 0.0


def test_three_rounds_then_refusal(tmp_path) -> None:
    model, t = tiny_peft("llama"), tok()
    path = tmp_path / "budget.json"
    budget = PrivacyBudget(path, total_epsilon=8.0, delta=1e-5)
    eps = []
    for r in range(3):
        upd = train_round(model, t, pairs(12), dp_spec(model, r), budget=budget)
        m = upd.metrics
        assert m["accountant"] == "prv" and m["delta"] == 1e-5 and m["noise_multiplier"] > 0.5
        assert m["sample_rate"] == pytest.approx(4 / 12)
        assert np.linalg.norm(upd.delta) <= 1.0 + 1e-12
        eps.append(m["epsilon"])
    assert eps[0] < eps[1] < eps[2] <= 8.0 and eps[2] > 7.0
    state = json.loads(path.read_text())
    assert [r["round_id"] for r in state["rounds"]] == [0, 1, 2] and state["accountant"] == "prv"
    before = get_lora_vector(model).copy()
    with pytest.raises(PrivacyBudgetExceeded, match="privacy budget exhausted.*total 8.0"):
        train_round(model, t, pairs(12), dp_spec(model, 3), budget=budget)
    np.testing.assert_array_equal(get_lora_vector(model), before)  # refused before training
    # a restarted client reads the spent budget from disk and refuses too
    again = PrivacyBudget(path, total_epsilon=8.0, delta=1e-5)
    assert again.spent() == pytest.approx(eps[2])
    with pytest.raises(PrivacyBudgetExceeded):
        train_round(model, t, pairs(12), dp_spec(model, 3), budget=again)
    assert len(json.loads(path.read_text())["rounds"]) == 3


def test_budget_file_guards(tmp_path) -> None:
    path = tmp_path / "b.json"
    b = PrivacyBudget(path, 8.0, 1e-5)
    b.record(0, 1.0, 0.1, 10)
    with pytest.raises(PrivacyBudgetExceeded, match="already trained"):
        b.check_can_spend(1.0, 0.1, 10, round_id=0)
    with pytest.raises(ConfigError, match="delta"):
        PrivacyBudget(path, 8.0, 1e-6)
    with pytest.raises(ConfigError, match="cannot be raised"):
        PrivacyBudget(path, 16.0, 1e-5)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        PrivacyBudget(path, 8.0, 1e-5)


def test_dp_round_without_budget_reports_round_epsilon() -> None:
    model = tiny_peft("gpt2")
    upd = train_round(model, tok(), pairs(12), dp_spec(model, 0))
    assert upd.metrics["epsilon_scope"].startswith("this round only")
    assert 0 < upd.metrics["epsilon"] < 8.0


def test_dp_batch_larger_than_data_is_refused() -> None:
    model = tiny_peft("llama")
    with pytest.raises(ConfigError, match="batch_size"):
        train_round(model, tok(), pairs(3), dp_spec(model, 0))


def test_dp_tiny_sample_rate_allows_empty_batches() -> None:
    """With q small, most Poisson batches are empty: they still take a (noise-only) step."""
    model = tiny_peft("llama")
    upd = train_round(model, tok(), pairs(12), dp_spec(model, 0, batch_size=1, local_steps=6))
    assert np.isfinite(upd.delta).all() and upd.metrics["pre_clip_norm"] > 0


def test_clip_l2() -> None:
    u, n = clip_l2(np.array([3.0, 4.0]), 1.0)
    assert n == 5.0 and np.linalg.norm(u) <= 1.0
    u, n = clip_l2(np.array([0.3, 0.4]), 1.0)
    np.testing.assert_array_equal(u, [0.3, 0.4])
