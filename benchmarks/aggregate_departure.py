"""How far SA-H-TIES departs from plaintext H-TIES, and how much the secure sum itself costs in accuracy.

``run_departure_bench`` returns a JSON-able dict; ``print_table`` renders it with rich.

Part 1 (method departure): random heterogeneous updates (K clients, P coordinates, ``n_clusters``
shared directions + Gaussian noise, random scale, clipped to L2 norm <= 1; optionally one client
anti-aligned to another). For every scenario and seed: relative L2 difference
``‖Δ*_SA - Δ*_H‖ / ‖Δ*_H‖`` for ``h_norm`` = reveal / none, the same for FedAvg (to give the scale of
a *different* method), the share of coordinates whose gate decision (+ / - / 0) agrees, and two
ablations that isolate the sources: plaintext weights with SA retention, SA weights with plaintext
retention (h_norm = none).

Part 2 (secure-sum precision): SA-H-TIES over the masking mode (fixed point, frac_bits 16 and 32)
and over the HE mode (CKKS) against SA-H-TIES over the plain numpy sum.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from fedproxy_secure.aggregate import AggState, fedavg, hties, make_aggregator
from fedproxy_secure.aggregate.hties import HTiesParams, gated_merge
from fedproxy_secure.aggregate.sa_hties import sa_client_h, sa_client_similarity, sa_weight_shift
from fedproxy_secure.aggregate.ties import keep_count, trim_top
from fedproxy_secure.secagg import make_summer

SCENARIOS = [  # name, n_clusters, noise, anti-aligned client
    ("near-homogeneous", 1, 0.5, False),
    ("3 clusters", 3, 0.7, False),
    ("3 clusters + conflict", 3, 0.7, True),
    ("8 distinct tasks", 8, 0.7, False),
    ("noise-dominated", 3, 3.0, False),
]


def make_updates(k: int, p: int, n_clusters: int, noise: float, conflict: bool, seed: int) -> list[np.ndarray]:
    """Clustered heterogeneous updates with L2 norm in [0.3, 1] (as after the trainer's clipping)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, p))
    ups = [centres[i % n_clusters] + noise * rng.normal(size=p) for i in range(k)]
    ups = [u / np.linalg.norm(u) * rng.uniform(0.3, 1.0) for u in ups]
    if conflict:
        ups[k - 1] = -ups[0] * rng.uniform(0.5, 1.0)
    return ups


def _merge(ups, w, r, prm: HTiesParams) -> np.ndarray:
    p = ups[0].size
    u = np.stack([wi * trim_top(d, keep_count(ri, p)) for wi, ri, d in zip(w, r, ups)])
    wpos = (np.asarray(w)[:, None] * (u > 0)).sum(0)
    wneg = (np.asarray(w)[:, None] * (u < 0)).sum(0)
    return gated_merge(np.maximum(u, 0).sum(0), np.minimum(u, 0).sum(0), wpos, wneg, prm.rho, prm.eps)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    n = float(np.linalg.norm(ref))
    return float(np.linalg.norm(a - ref) / n) if n > 0 else float(np.linalg.norm(a))


def _gate_agree(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sign(a) == np.sign(b)))


def departure_one(ups: list[np.ndarray], prm: HTiesParams = HTiesParams()) -> dict:
    """All departure figures for one set of updates."""
    k = len(ups)
    ref = hties(ups, prm)
    out: dict = {"mean_cos": float((ref.cosine.sum() - k) / (k * (k - 1))),
                 "min_cos": float(ref.cosine.min())}
    for h_norm in ("reveal", "none"):
        d = make_aggregator("sa_hties", **{**prm.__dict__, "h_norm": h_norm}).aggregate(ups, [1] * k, AggState()).delta
        out[f"rel_l2_sa_{h_norm}"] = _rel(d, ref.delta)
        out[f"gate_agree_sa_{h_norm}"] = _gate_agree(d, ref.delta)
    out["rel_l2_fedavg"] = _rel(fedavg(ups), ref.delta)
    # ablations (h_norm = none): which SA simplification costs what
    t = sum(x / np.linalg.norm(x) for x in ups)
    s = np.array([sa_client_similarity(d, t) for d in ups])
    w_sa = np.exp(s - sa_weight_shift(t))
    r_sa = np.clip(prm.r0 - prm.delta * np.array([sa_client_h(d, t, k) for d in ups]), 0, 1)
    out["rel_l2_ablation_sa_weights_only"] = _rel(_merge(ups, w_sa, ref.retention, prm), ref.delta)
    out["rel_l2_ablation_sa_retention_only"] = _rel(_merge(ups, ref.weights, r_sa, prm), ref.delta)
    return out


def _secure_sum_fn(summer, k):
    def fn(vs):
        return summer.secure_sum({i + 1: v for i, v in enumerate(vs)}, threshold=k, session_id=os.urandom(32)).total
    return fn


def precision_one(ups: list[np.ndarray]) -> list[dict]:
    """SA-H-TIES over masking / HE secure sums vs over the plain sum (default h_norm)."""
    k = len(ups)
    plain = make_aggregator("sa_hties").aggregate(ups, [1] * k, AggState()).delta
    rows = []
    for label, mode, opts in [
        ("masking frac_bits=16", "masking", {"frac_bits": 16}),
        ("masking frac_bits=32", "masking", {"frac_bits": 32}),
        ("he CKKS scale 2^40 (tol 1e-3)", "he", {"clip": 1.0, "tolerance": 1e-3}),
        ("he CKKS scale 2^50 [60,50]", "he", {"clip": 1.0, "tolerance": 1e-4, "coeff_mod_bit_sizes": (60, 50), "scale_bits": 50}),
    ]:
        t0 = time.perf_counter()
        d = make_aggregator("sa_hties", secure_sum=_secure_sum_fn(make_summer(mode, **opts), k)).aggregate(
            ups, [1] * k, AggState()).delta
        rows.append({"secure_sum": label, "rel_l2_vs_plain_sum": _rel(d, plain),
                     "max_abs_diff": float(np.abs(d - plain).max()),
                     "gate_agree": _gate_agree(d, plain), "seconds": time.perf_counter() - t0})
    return rows


def run_departure_bench(k: int = 8, p: int = 10000, seeds: int = 5, precision_p: int = 2000,
                        json_path: str | Path | None = None) -> dict:
    """Run both parts; return (and optionally write) the JSON-able result."""
    prm = HTiesParams()
    scen = []
    for name, nc, noise, conflict in SCENARIOS:
        per_seed = [departure_one(make_updates(k, p, nc, noise, conflict, s), prm) for s in range(seeds)]
        keys = per_seed[0].keys()
        scen.append({"scenario": name, "n_clusters": nc, "noise": noise, "conflict_client": conflict,
                     "mean": {kk: float(np.mean([r[kk] for r in per_seed])) for kk in keys},
                     "max": {kk: float(np.max([r[kk] for r in per_seed])) for kk in keys}})
    prec = precision_one(make_updates(k, precision_p, 3, 0.7, True, 0))
    out = {"k": k, "p": p, "seeds": seeds, "params": prm.__dict__, "scenarios": scen,
           "precision": {"p": precision_p, "rows": prec}}
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2))
    return out


def print_table(result: dict) -> None:
    """Render the result with rich."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SA-H-TIES vs plaintext H-TIES: relative L2 of Δ* (K={result['k']}, P={result['p']}, "
                    f"mean [max] over {result['seeds']} seeds)")
    for c in ("scenario", "mean cos", "SA reveal", "SA none", "gate agree (reveal/none)",
              "ablation: SA w only", "ablation: SA r only", "FedAvg (scale)"):
        t.add_column(c)
    for s in result["scenarios"]:
        m, x = s["mean"], s["max"]
        f = lambda key: f"{m[key]:.3f} [{x[key]:.3f}]"  # noqa: E731
        t.add_row(s["scenario"], f"{m['mean_cos']:.2f}", f("rel_l2_sa_reveal"), f("rel_l2_sa_none"),
                  f"{m['gate_agree_sa_reveal']:.3f}/{m['gate_agree_sa_none']:.3f}",
                  f("rel_l2_ablation_sa_weights_only"), f("rel_l2_ablation_sa_retention_only"), f("rel_l2_fedavg"))
    t2 = Table(title=f"SA-H-TIES over secure sums vs over the plain sum (P={result['precision']['p']}, default h_norm)")
    for c in ("secure sum", "rel L2", "max |diff|", "gate agree", "seconds"):
        t2.add_column(c)
    for r in result["precision"]["rows"]:
        t2.add_row(r["secure_sum"], f"{r['rel_l2_vs_plain_sum']:.2e}", f"{r['max_abs_diff']:.2e}",
                   f"{r['gate_agree']:.4f}", f"{r['seconds']:.2f}")
    con = Console()
    con.print(t)
    con.print(t2)


if __name__ == "__main__":
    import sys

    res = run_departure_bench(json_path=sys.argv[1] if len(sys.argv) > 1 else None)
    print_table(res)
    print(json.dumps(res))
