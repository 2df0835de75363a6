"""Benchmark: FedProxy on Flower's simulation engine with many virtual SuperNodes (tiny proxy, SecAgg+).

    .venv/flower/bin/python -m fedproxy_benchmarks.flower_scale --nodes 1000 --out results/flower-scale-1000.json

One federation: the server compresses a tiny LLM built from a config (no download), signs the
proxy bundle, every node verifies it (join), then ``--rounds`` FedAvg rounds whose sums all go
through Flower's SecAgg+ (k = ``--shares`` neighbours, threshold ``--threshold``). Recorded: join
time, each round's wall time and survivors, and the peak resident memory of the whole process tree
(ServerApp + Ray + ClientApp actors), sampled every 0.5 s from /proc via psutil (peaks shorter than
that can be missed). Run on a 2-core machine the ClientApp actors run 2 at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

CONFIG = """
name: flower-scale
seed: 0
model:
  tiny: {{arch: llama, layers: 4, hidden: 16, heads: 2, intermediate: 32, vocab: 259, max_positions: 128}}
compress: {{strategy: bi, keep_ratio: 0.5, calib_examples: 4}}
data:
  dir: {data}
  tasks: [sports_understanding, navigate, metaphor_boolean, strategyqa, intent_recognition, social_support]
  calib_tasks: [winowhy]
  partition: iid
  limit_train: 70
  limit_test: 4
  max_length: 96
clients: {{count: {sites}}}
rounds: {rounds}
train: {{lr: 0.01, local_steps: 1, batch_size: 1, update_clip_norm: 1.0}}
lora: {{r: 1, alpha: 2, ffa: true}}
aggregator: {{name: fedavg}}
secagg: {{mode: masking}}
dp: {{enabled: false}}
fusion: {{method: weight}}
"""


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants until stopped; keeps the peak."""

    def __init__(self, interval_s: float = 0.5) -> None:
        import psutil

        self._root = psutil.Process(os.getpid())
        self.interval_s, self.peak, self.peak_procs = interval_s, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total, n = 0, 0
            for p in [self._root, *self._root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                    n += 1
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            if total > self.peak:
                self.peak, self.peak_procs = total, n
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def run(nodes: int, out: Path, *, rounds: int = 1, shares: int | None = None, threshold: int | None = None,
        work: Path | None = None, data: Path | None = None) -> dict:
    """Run the benchmark and write ``out`` (JSON); returns the record. Figures come from this run only."""
    from fedproxy_secure.flower.bundle_wire import init_operator
    from fedproxy_secure.flower.settings import FlowerSettings
    from fedproxy_secure.flower.simulation import run_in_simulation

    root = Path(__file__).resolve().parents[1]  # the checkout (benchmarks/ sits at its top)
    data = data or root / "examples" / "data" / "bigbench-mini"
    k = shares or (2 * math.ceil(math.log2(nodes)) + 1)  # odd, ~2 log2 n (SecAgg+ wants an odd share count)
    k = min(k, nodes)
    t = threshold or max(2, math.ceil(2 * k / 3))
    work = Path(work or tempfile.mkdtemp(prefix="fedproxy-flower-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    sites = min(nodes, 6 * 66)  # one example per site at most; nodes beyond reuse sites (reuse-partitions)
    (work / "cfg.yaml").write_text(CONFIG.format(data=data, sites=sites, rounds=rounds))
    key, keyset = init_operator(work / "keys")
    s = FlowerSettings(config=work / "cfg.yaml", keyset=keyset, operator_key=key, out=work / "out",
                       state_root=work / "state", secure="secaggplus", num_shares=k, reconstruction_threshold=t,
                       max_weight=64.0, min_clients=nodes, evaluate=False, reuse_partitions=True, timeout_s=3600)
    t0 = time.time()
    with PeakRSS() as mem:
        res = run_in_simulation(s, nodes, cpus_per_node=1.0, ray_cpus=os.cpu_count())
    wall = time.time() - t0
    record = {
        "benchmark": "flower-scale", "nodes": nodes, "rounds": rounds, "secure": "flower-secaggplus",
        "aggregator": "fedavg", "secaggplus": {"num_shares": k, "threshold": t, "clipping_range": s.clipping_range,
                                               "quantization_range": s.quantization_range},
        "accepted": res["accepted"], "bundle_bytes": res["bundle"]["bytes"],
        "join_seconds": res.get("join_seconds"), "round_seconds": [r["seconds"] for r in res["rounds"]], "survivors": [r["survivors"] for r in res["rounds"]],
        "total_seconds": round(wall, 1), "server_seconds": res["seconds"],
        "peak_rss_bytes": mem.peak, "peak_rss_gib": round(mem.peak / 2**30, 2), "processes_at_peak": mem.peak_procs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--shares", type=int, default=None, help="SecAgg+ neighbours k (default 2*ceil(log2 n)+1)")
    ap.add_argument("--threshold", type=int, default=None, help="SecAgg+ threshold (default ceil(2k/3))")
    ap.add_argument("--out", type=Path, default=Path("results/flower-scale-1000.json"))
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args(argv)
    rec = run(a.nodes, a.out, rounds=a.rounds, shares=a.shares, threshold=a.threshold, work=a.work)
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
