"""``bench scale --rss`` / ``--he-explore`` / ``--merge``: the client-memory comparison runs each side in its own
process through the SDK trainer, derives per-block figures from the two sides, and the HE encodings it times
decrypt correctly. Tiny models only (SmolLM2 figures come from the benchmark command, not from tests)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fedproxy_secure.cli.bench_scale  # noqa: F401  (registers the command)
from fedproxy_benchmarks import scale, scale_he, scale_memory
from fedproxy_secure.cli.app import app
from fedproxy_secure.models.tiny import TinyModelSpec, save_tiny_llm


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("rss")
    llm = save_tiny_llm(TinyModelSpec(layers=8, hidden=32, heads=2, intermediate=64, vocab=259), tmp / "llm")
    return scale_memory.client_memory(llm, proxy_dir=tmp / "proxy", batch=2, seq=32, steps=2, threads=1,
                                      extra_batches=(4,), lock=str(tmp / "lock")), tmp


def test_each_side_is_a_fresh_process_through_the_trainer_with_the_same_shape(memory_run):
    mem, tmp = memory_run
    assert (tmp / "proxy" / "fedproxy.json").is_file()  # built by the SDK's compress + save_proxy
    assert len(mem["proxy_layer_map"]) == 4 and mem["keep_ratio"] == 0.5
    assert [(p["batch"], p["seq"]) for p in mem["points"]] == [(2, 32), (4, 32)]
    for pt in mem["points"]:
        p, q = pt["proxy"], pt["llm"]
        assert (p["n_blocks"], q["n_blocks"]) == (4, 8)
        # FFA-LoRA on the same targets: the proxy trains exactly half the LLM's LoRA values
        assert 2 * p["lora_trainable"] == q["lora_trainable"] > 0
        for s in (p, q):
            assert len(s["step_s"]) == 2 and np.isfinite(s["final_loss"])
            # the kernel's figure for the child is at least what the child saw of itself at every phase
            # (training a tiny model may add nothing measurable above the fixed part: >=, not >)
            assert s["peak_rss_bytes"] >= max(s["step_maxrss_bytes"]) >= s["fixed_bytes"] > 0
        assert pt["ratio_peak_rss"] == pytest.approx(p["peak_rss_bytes"] / q["peak_rss_bytes"])
        assert pt["per_block"]["params"] * 8 + pt["outside_blocks"]["params"] == pt["model"]["params_llm"]
    assert mem["target"]["measured"] == mem["points"][0]["ratio_peak_rss"]
    assert mem["target"]["met"] == (mem["target"]["measured"] <= scale_memory.TARGET_RSS_RATIO)


def test_a_failing_child_is_reported_not_swallowed(tmp_path):
    with pytest.raises(RuntimeError, match="failed"):
        scale_memory.run_child(["train", str(tmp_path / "missing"), "1", "8", "1", "1", "0", "1"],
                               lock=str(tmp_path / "lock"), timeout=300)


def test_he_encodings_decrypt_and_keep_the_size():
    rows = scale_he.explore(values=8192, threads=(1, 2), repeats=1, degrees=(4096,))  # whole ciphertexts
    assert {r["variant"] for r in rows} == set(scale_he.VARIANTS)
    for r in rows:
        assert r["max_abs_error"] < 1e-4, r
        assert 30 < r["bytes_per_value"] <= scale.TARGET_HE_BYTES_PER_VALUE, r
    with pytest.raises(Exception, match="128-bit"):
        scale_he.explore(values=10, threads=(1,), repeats=1, degrees=(4096,), bits=(60, 40, 40))


def test_cli_rss_merge_keeps_the_other_parts_and_recomputes_targets(memory_run, tmp_path, monkeypatch):
    mem, _ = memory_run
    out = tmp_path / "scale.json"
    prev = {"he": [{"values": 10, "threads": 1, "encrypt_us_per_value": 3.0, "bytes_per_value": 33.0}],
            "masking_target": {"client_over_prg_limit": 1.1}}
    out.write_text(json.dumps(prev))
    monkeypatch.setattr(scale_memory, "client_memory", lambda **kw: dict(mem, kwargs_seen=sorted(kw)))
    r = CliRunner().invoke(app, ["bench", "scale", "--skip", "masking", "--skip", "he", "--rss", "--rss-batch", "2",
                                 "--json", str(out), "--merge", "--plots", str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["parts_measured"] == ["rss"] and sorted(data["parts_carried"]) == ["he", "masking"]
    assert set(data["targets"]) == {"client_over_prg_limit_at_10", "he_encrypt_us_per_value", "he_bytes_per_value",
                                    "client_peak_rss_proxy_over_llm"}
    assert data["targets"]["he_encrypt_us_per_value"]["met"] is False
    assert data["targets"]["client_over_prg_limit_at_10"]["met"] is True
    assert (tmp_path / "png" / "client_peak_rss.png").is_file()
    proj = data["projection_7b"]  # derived from the measured per-block figures of the (tiny) run
    assert proj["params"]["llm"] == 6_738_415_616 and proj["params"]["proxy_blocks"] == 16
    assert proj["client_proxy_training"]["peak_gib_fp32"] < proj["client_llm_training_for_comparison"]["peak_gib_fp32"]
    assert "per decoder block" in r.output
    bad = CliRunner().invoke(app, ["bench", "scale", "--skip", "masking", "--skip", "he"])
    assert bad.exit_code != 0
