"""Load: 50 client processes complete one masked round (slow; figures in docs/experiments.md)."""

import pytest


@pytest.mark.slow
def test_fifty_clients_masked_round(tmp_path):
    from fedproxy_benchmarks.net_load import run

    res = run(50, 64, str(tmp_path / "load.json"))
    assert res["status"] == "done" and res["survivors"] == 50
