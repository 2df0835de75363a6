"""The fusion study runs end to end on a tiny model (every variant) through the SDK, resumes from its
cache, and its table is what its per-example predictions give."""

from __future__ import annotations

import json
from pathlib import Path

from fedproxy_secure.config import TinyModelSpec
from fedproxy_secure.models.tiny import save_tiny_llm

ROOT = Path(__file__).resolve().parents[1]

def _mod():
    from fedproxy_benchmarks import fusion_study

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
                        distill_steps=2, threads=1, n_boot=200)
    s = m.run_fusion_study(cfg, log=lambda _: None)
    names = [r["variant"] for r in s["rows"]]
    assert names == list(m.ALL_VARIANTS)
    for r in s["rows"]:
        assert 0.0 <= r["fused_bal"] <= 1.0 and 0.0 <= r["fused_acc"] <= 1.0
        if r["variant"] not in ("zs_llm", "llm_lora"):
            assert r["proxy_bal"] is not None and len(r["transfer_ci"]) == 2
    for f in ("results.json", "results.md", "fusion_study.png", "predictions.jsonl"):
        assert (tmp_path / "out" / f).is_file()
    # the study's own copies are gone: it uses the SDK's compression, distillation and trainer
    for gone in ("block_influence", "distill", "train_lora", "agreement", "bi_keep"):
        assert not hasattr(m, gone)
    from fedproxy_secure.eval import summaries_from_jsonl

    rec = summaries_from_jsonl(tmp_path / "out" / "predictions.jsonl", reference="zs_llm", upper="llm_lora", n_boot=cfg.n_boot)
    import numpy as np

    np.testing.assert_equal(rec[""]["methods"]["bi50_logit"]["ratio_ci"],  # NaN == NaN here (undefined ratio)
                            next(r for r in s["rows"] if r["variant"] == "bi50_logit")["transfer_ci"])
    d = json.loads((tmp_path / "out" / "proxy_bi50d.json").read_text())
    assert d["distilled"] and d["agreement"]["after"]["kl"] >= 0
    ot = json.loads((tmp_path / "out" / "proxy_ot.json").read_text())
    assert ot["layer_map"][:2] == [0, 1] and ot["layer_map"][-2:] == [6, 7]
    # resuming reuses every cached variant (no retraining): same numbers
    s2 = m.run_fusion_study(cfg, log=lambda _: None)
    assert json.dumps(s2["rows"]) == json.dumps(s["rows"])  # NaN-safe equality
