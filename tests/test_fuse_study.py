"""The fusion study runs end to end on a tiny model (every variant), resumes from its cache and writes outputs."""

from __future__ import annotations

import json
from pathlib import Path

from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.models.tiny import save_tiny_llm

ROOT = Path(__file__).resolve().parents[1]

def _mod():
    from fedproxy_secure.bench import fusion_study

    return fusion_study


def _server_task(path: Path, name: str) -> None:
    exs = [{"input": f"Server question {i} about {name}?", "target_scores": {"yes": i % 2, "no": 1 - i % 2}} for i in range(6)]
    (path / f"{name}.json").write_text(json.dumps({"examples": exs}))


def test_fusion_study_tiny_all_variants(tmp_path):
    m = _mod()
    llm = save_tiny_llm(TinyModelSpec(layers=8, hidden=32, heads=4, intermediate=64, vocab=300, max_positions=512), tmp_path / "llm")
    srv = tmp_path / "srv"
    srv.mkdir()
    for n in ("anachronisms", "snarks"):
        _server_task(srv, n)
    cfg = m.StudyConfig(llm=str(llm), data_dir=str(ROOT / "examples/data/bigbench-mini"), out=str(tmp_path / "out"),
                        server_dir=str(srv), limit_train=2, limit_test=2, max_length=96, server_texts=4,
                        distill_steps=2, threads=1)
    s = m.run_fusion_study(cfg, log=lambda _: None)
    names = [r["variant"] for r in s["rows"]]
    assert names == list(m.ALL_VARIANTS)
    for r in s["rows"]:
        assert 0.0 <= r["fused_acc"] <= 1.0
    assert (tmp_path / "out" / "results.json").is_file() and (tmp_path / "out" / "fusion_study.png").is_file()
    ot = json.loads((tmp_path / "out" / "proxy_ot.json").read_text())
    assert ot["layer_map"][:2] == [0, 1] and ot["layer_map"][-2:] == [6, 7]
    # resuming reuses every cached variant (no retraining): same numbers
    s2 = m.run_fusion_study(cfg, log=lambda _: None)
    assert s2["rows"] == s["rows"]
