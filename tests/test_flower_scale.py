"""Slow benchmark: 1,000 virtual SuperNodes on Flower's simulation engine (tiny proxy, FedAvg under SecAgg+).

Runs ``fedproxy_benchmarks.flower_scale`` (benchmarks/flower_scale.py) in the Flower overlay venv and checks what it measured: every
node verified the signed bundle and survived each SecAgg+ round, and the JSON records round time and
peak memory. ``make test-slow`` runs it (tens of minutes on 2 cores); the committed figures are in
results/flower-scale-1000.json and docs/flower.md.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOWER_PY = ROOT / ".venv" / "flower" / "bin" / "python"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not FLOWER_PY.is_file(), reason="the Flower overlay venv is missing: run `make venv`")]


@pytest.mark.timeout(3600)
def test_flower_1000_nodes_secaggplus_round(tmp_path):
    out = tmp_path / "flower-scale-1000.json"
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([str(FLOWER_PY), "-m", "fedproxy_benchmarks.flower_scale", "--nodes", "1000", "--rounds", "1",
                        "--out", str(out), "--work", str(tmp_path / "work")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=3500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rec = json.loads(out.read_text())
    assert rec["nodes"] == 1000 and rec["accepted"] == 1000
    assert rec["survivors"] == [1000]
    assert rec["secaggplus"]["num_shares"] == 21 and rec["secaggplus"]["threshold"] == 14
    assert rec["round_seconds"][0] > 0 and rec["peak_rss_bytes"] > 0
