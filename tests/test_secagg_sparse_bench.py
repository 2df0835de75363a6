"""``bench scale``: the sparse graph's per-client cost follows k, not n; the command writes JSON and PNGs."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

import fedproxy_secure.cli.bench_scale  # noqa: F401  (registers the command)
from fedproxy_benchmarks.scale import masking_point, prg_limit_seconds
from fedproxy_secure.cli.app import app
from fedproxy_secure.wire.threshold import secagg_plus_degree


def test_share_bytes_per_client_follow_the_degree_not_the_cohort():
    torch.set_num_threads(1)
    a, b = masking_point(70, 8), masking_point(140, 8)
    assert (a["graph"], b["graph"]) == ("secagg+", "secagg+")
    assert (a["degree"], b["degree"]) == (secagg_plus_degree(70), secagg_plus_degree(140))
    up_a = a["bytes_per_client_by_stage"]["share"]["up"]
    up_b = b["bytes_per_client_by_stage"]["share"]["up"]
    # n doubles, k grows by 2: the shares a client uploads grow like k (within JSON framing)
    assert abs(up_b / up_a - b["degree"] / a["degree"]) < 0.02
    full = masking_point(70, 8, complete=True)
    assert full["degree"] == 69 and full["bytes_per_client_by_stage"]["share"]["up"] > 2 * up_a
    assert a["max_abs_error"] < 70 * 2.0**-31 and full["max_abs_error"] < 70 * 2.0**-31
    assert prg_limit_seconds(3, 1000) > 0


def test_bench_scale_command_writes_table_json_and_plots(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "scale.json"
    r = CliRunner().invoke(app, [
        "bench", "scale", "--clients", "5", "--clients", "70", "--values", "64", "--target-values", "0",
        "--he-values", "64", "--he-threads", "1", "--repeats", "1", "--json", str(out), "--plots", str(tmp_path / "png"),
    ])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert [p["n"] for p in data["masking"]] == [5, 70]
    assert [p["n"] for p in data["masking_complete_graph"]] == [70]
    assert data["masking"][1]["degree"] == secagg_plus_degree(70)
    assert data["he"][0]["bytes_per_value"] > 0 and "he_bytes_per_value" in data["targets"]
    pngs = sorted(p.name for p in (tmp_path / "png").glob("*.png"))
    assert pngs == sorted(["masking_client_seconds.png", "masking_server_seconds.png", "masking_bytes_per_client.png",
                           "masking_client_over_prg_limit.png", "he_encrypt_us_per_value.png"])
    assert "client/PRG" in r.output
    assert "growth in n" in r.output and "70" in next(iter(data["log_growth"]["exponent_bytes_per_client"]))


def test_growth_exponent_and_issue_28_targets():
    from fedproxy_benchmarks.scale import compute_targets, growth_exponent

    pts = [{"n": 10, "lin": 1.0, "flat": 5.0}, {"n": 100, "lin": 10.0, "flat": 5.0}, {"n": 1000, "lin": 100.0, "flat": 5.0}]
    assert growth_exponent(pts, "lin") == {"10->100": 1.0, "100->1000": 1.0}
    assert growth_exponent(pts, "flat") == {"10->100": 0.0, "100->1000": 0.0}
    masking = [{"n": 100, "values": 1000, "bytes_per_client": 35_000, "server_s": 0.1},
               {"n": 1000, "values": 1000, "bytes_per_client": 56_000, "server_s": 1.6}]
    t = compute_targets({"masking": masking})
    assert t["bytes_per_site_1000_over_100"] == {"measured": 1.6, "target": 1.5, "met": False}
    assert t["server_s_at_1000"]["met"] is False and t["server_s_at_1000"]["measured"] == 1.6


def test_merge_keeps_what_a_measured_part_did_not_redo():
    from fedproxy_benchmarks.scale import merge_previous

    new = {"parts_measured": ["he"], "he": [{"workers": 1, "encrypt_us_per_value": 2.0, "bytes_per_value": 33.0}]}
    old = {"parts_measured": ["he", "masking"], "he": [{"threads": 1, "encrypt_us_per_value": 9.0,
                                                        "bytes_per_value": 33.0}],
           "he_explore": [{"variant": "vector"}], "masking": [{"n": 10}]}
    m = merge_previous(new, old)
    assert m["he"] == new["he"] and m["he_explore"] == old["he_explore"] and m["masking"] == old["masking"]
    assert set(m["parts_carried"]) == {"he_explore", "masking"}
