"""Client trainer: PCR gradient, FFA exactness, update clipping, bad input, LoRA layout helpers."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch

from client_helpers import pairs, tiny, tiny_peft, tok
from fedproxy_secure.client.trainer import (
    ClientRoundSpec, TrainingAborted, regulariser_gradient, train_centralized, train_round,
)
from fedproxy_secure.config import LoraConfig
from fedproxy_secure.data import PromptResponse
from fedproxy_secure.errors import DataError, ModelError
from fedproxy_secure.lora import (
    attach_lora, full_lora_state, get_lora_vector, lora_names, merged_deltas, save_adapter, set_lora_vector,
)


def spec(model, **kw) -> ClientRoundSpec:
    dim = get_lora_vector(model).size
    base = dict(round_id=0, a_seed=7, theta_global=get_lora_vector(model), conflict=None, pcr_lambda=1e-5, lr=1e-2,
                local_steps=3, batch_size=4, max_length=64, clip_norm=10.0, dp=None, planned_rounds=3, shuffle_seed=0)
    base.update(kw)
    return ClientRoundSpec(**base)


def test_pcr_gradient_is_2_lambda_c_times_diff() -> None:
    model = tiny_peft("llama")
    rng = np.random.default_rng(0)
    dim = get_lora_vector(model).size
    theta, theta_g, c = rng.normal(size=dim), rng.normal(size=dim), rng.uniform(0, 1, size=dim)
    set_lora_vector(model, theta)
    lam = 0.3
    g = regulariser_gradient(model, spec(model, theta_global=theta_g, conflict=c, pcr_lambda=lam))
    want = 2 * lam * c * (get_lora_vector(model) - theta_g)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    assert np.abs(want).max() > 0.01
    # with FedProx on top the gradient gains mu * (theta - theta_g)
    g2 = regulariser_gradient(model, spec(model, theta_global=theta_g, conflict=c, pcr_lambda=lam, fedprox_mu=0.5))
    np.testing.assert_allclose(g2, want + 0.5 * (get_lora_vector(model) - theta_g), rtol=1e-5, atol=1e-7)
    assert not regulariser_gradient(model, spec(model, theta_global=theta_g, conflict=None)).any()


def test_pcr_pulls_conflicting_coordinates_back() -> None:
    """With a huge λ on C=1 coordinates, training leaves them (almost) at theta_global."""
    model, t = tiny_peft("llama"), tok()
    dim = get_lora_vector(model).size
    c = np.zeros(dim)
    c[: dim // 2] = 1.0
    other = tiny_peft("llama")
    free = train_round(other, t, pairs(), spec(other, conflict=c, pcr_lambda=0.0)).delta
    held = train_round(model, t, pairs(), spec(model, conflict=c, pcr_lambda=1e4, lr=1e-3)).delta
    assert np.abs(free[: dim // 2]).max() > 1e-3
    assert np.abs(held[: dim // 2]).max() < 0.2 * np.abs(free[: dim // 2]).max()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ffa_averaging_b_equals_averaging_delta_w(arch: str) -> None:
    rng = np.random.default_rng(1)
    clients = [tiny_peft(arch, ffa=True).double() for _ in range(3)]
    vecs = [rng.normal(scale=0.1, size=get_lora_vector(clients[0]).size) for _ in clients]
    for m, v in zip(clients, vecs):
        set_lora_vector(m, v)
    avg_of_dw = {k: sum(merged_deltas(m)[k] for m in clients) / 3 for k in merged_deltas(clients[0])}
    server = tiny_peft(arch, ffa=True).double()
    set_lora_vector(server, sum(vecs) / 3)
    dw = merged_deltas(server)
    assert set(dw) == set(avg_of_dw) and len(dw) > 0
    for k in dw:
        torch.testing.assert_close(dw[k], avg_of_dw[k], rtol=1e-12, atol=1e-14)
    # with A trained too, coordinate-wise averaging is NOT the average of B·A (why FFA is the default)
    full = [tiny_peft(arch, ffa=False).double() for _ in range(2)]
    fv = [rng.normal(scale=0.3, size=get_lora_vector(full[0]).size) for _ in full]
    for m, v in zip(full, fv):
        set_lora_vector(m, v)
    ref = {k: (merged_deltas(full[0])[k] + merged_deltas(full[1])[k]) / 2 for k in merged_deltas(full[0])}
    set_lora_vector(full[0], (fv[0] + fv[1]) / 2)
    gap = max(float((merged_deltas(full[0])[k] - ref[k]).abs().max()) for k in ref)
    assert gap > 1e-3


def test_attach_lora_is_deterministic_and_ffa_freezes_a() -> None:
    a, b = tiny_peft("llama", a_seed=5), tiny_peft("llama", a_seed=5, seed=3)
    sa, sb = full_lora_state(a), full_lora_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
        assert ".default." not in k
    assert all(".lora_B." in n for n in lora_names(a))
    c = full_lora_state(tiny_peft("llama", a_seed=6))
    assert any(not torch.equal(sa[k], c[k]) for k in sa if ".lora_A." in k)
    assert all(not sa[k].any() for k in sa if ".lora_B." in k)
    full = tiny_peft("llama", ffa=False)
    assert any(".lora_A." in n for n in lora_names(full))
    with pytest.raises(ModelError, match="trainable LoRA has"):
        set_lora_vector(a, np.zeros(3))


def test_default_targets_and_saved_adapter_reloads(tmp_path) -> None:
    for arch, n_targets in (("llama", 7), ("gpt2", 4)):
        model = tiny_peft(arch)
        assert len(merged_deltas(model)) == 2 * n_targets
        rng = np.random.default_rng(2)
        set_lora_vector(model, rng.normal(size=get_lora_vector(model).size))
        out = save_adapter(model, tmp_path / arch)
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        again = peft.PeftModel.from_pretrained(tiny(arch), str(out))
        s1, s2 = full_lora_state(model), full_lora_state(again)
        for k in s1:
            torch.testing.assert_close(s1[k], s2[k])


def test_train_round_returns_clipped_delta_from_theta_global() -> None:
    model, t = tiny_peft("gpt2"), tok()
    dim = get_lora_vector(model).size
    theta_g = np.full(dim, 0.01)
    upd = train_round(model, t, pairs(), spec(model, theta_global=theta_g, clip_norm=1e-3))
    assert upd.delta.dtype == np.float64 and upd.delta.shape == (dim,)
    assert upd.metrics["pre_clip_norm"] > 1e-3
    assert upd.metrics["post_clip_norm"] <= 1e-3 + 1e-15
    assert abs(np.linalg.norm(upd.delta) - 1e-3) < 1e-9
    np.testing.assert_allclose(get_lora_vector(model) - theta_g, upd.delta * upd.metrics["pre_clip_norm"] / 1e-3,
                               rtol=1e-5, atol=1e-9)
    for key in ("train_loss", "pre_clip_norm", "post_clip_norm", "steps", "truncated", "seconds"):
        assert key in upd.metrics
    assert upd.num_examples == len(pairs()) and upd.metrics["steps"] == 3
    assert "epsilon" not in upd.metrics


def test_training_lowers_the_loss() -> None:
    model, t = tiny_peft("llama"), tok()
    data = [PromptResponse("Q: colour of the sky?\nA:", " blue")] * 8
    upd = train_round(model, t, data, spec(model, local_steps=30, lr=1e-2, batch_size=8))
    fresh = tiny_peft("llama")
    first = train_round(fresh, t, data, spec(fresh, local_steps=1, lr=1e-2, batch_size=8))
    assert upd.metrics["final_loss"] < 0.95 * first.metrics["final_loss"]


def test_centralized_trains_full_lora() -> None:
    t = tok()
    res = train_centralized(tiny("llama"), t, pairs(), epochs=2, lr=1e-2, batch_size=4, max_length=64)
    assert res["steps"] == 6 and np.isfinite(res["train_loss"])
    assert any(".lora_A." in n for n in lora_names(res["model"]))


def test_empty_dataset_is_refused() -> None:
    model = tiny_peft("llama")
    with pytest.raises(DataError, match="empty"):
        train_round(model, tok(), [], spec(model))
    with pytest.raises(DataError, match="response token"):
        train_round(model, tok(), [PromptResponse("hello", "")], spec(model))


def test_long_prompts_are_truncated_with_warning_and_counted() -> None:
    model, t = tiny_peft("llama", max_positions=48), tok()
    data = pairs(4) + [PromptResponse("x" * 500, " yes"), PromptResponse("y" * 90, " no")]
    with pytest.warns(UserWarning, match="2 of 6 examples exceed max_length=48"):
        upd = train_round(model, t, data, spec(model, max_length=512))  # capped at the model's context
    assert upd.metrics["truncated"] == 2


def test_nan_loss_aborts_and_sends_nothing() -> None:
    model, t = tiny_peft("llama"), tok()
    dim = get_lora_vector(model).size
    bad = np.zeros(dim)
    bad[0] = np.nan
    with pytest.raises(TrainingAborted, match="nothing is sent"):
        train_round(model, t, pairs(), spec(model, theta_global=bad))
    with pytest.raises(TrainingAborted):
        train_round(model, t, pairs(), spec(model, lr=float("inf")))


def test_layout_mismatch_is_refused() -> None:
    model = tiny_peft("llama")
    with pytest.raises(ModelError, match="theta_global"):
        train_round(model, tok(), pairs(), spec(model, theta_global=np.zeros(5)))
    with pytest.raises(ModelError, match="conflict"):
        train_round(model, tok(), pairs(), spec(model, conflict=np.zeros(5)))


def test_round_train_fn_adapter() -> None:
    from fedproxy_secure.client.round_fn import make_round_train_fn

    model = tiny_peft("llama", a_seed=7)
    fn = make_round_train_fn(model, tok(), pairs(), a_seed=7, defaults={"local_steps": 2, "lr": 1e-2, "max_length": 64})
    theta = get_lora_vector(model)
    delta, rep = fn(theta, {"round_id": 1, "clip_norm": 0.1, "a_seed": 7, "conflict": [1.0] * theta.size})
    assert delta.shape == theta.shape and np.linalg.norm(delta) <= 0.1 + 1e-12 and rep["steps"] == 2
    with pytest.raises(ModelError, match="a_seed"):
        fn(theta, {"round_id": 2, "clip_norm": 0.1, "a_seed": 8})
