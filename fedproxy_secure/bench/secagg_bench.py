"""Benchmark of masking-mode secure aggregation against a plaintext sum.

``run_secagg_bench`` returns a JSON-able dict; ``print_secagg_table`` renders it with rich.
Timings are medians over ``repeats`` runs on this machine (single-threaded numpy / OpenSSL).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from fedproxy_secure.secagg.base import DropoutPlan
from fedproxy_secure.secagg.encoding import FixedPointEncoder
from fedproxy_secure.secagg.masking import MaskingSummer, derive_session_id


def _plaintext_sum(vectors: dict[int, np.ndarray]) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    acc = np.zeros(len(next(iter(vectors.values()))), dtype=np.float64)
    for v in vectors.values():
        acc += v
    return acc, time.perf_counter() - t0


def _masked_run(vectors, threshold, plan, repeats, neighbours) -> dict:
    runs = []
    for r in range(repeats):
        summer = MaskingSummer(neighbours=neighbours, wire_stats=(r == 0))
        sid = derive_session_id("bench", r, os.urandom(16))
        runs.append(summer.secure_sum(vectors, threshold=threshold, session_id=sid, dropouts=plan))
    survivors = runs[0].survivors
    plain, plain_s = _plaintext_sum({i: vectors[i] for i in survivors})
    sec = [x.stats["seconds"] for x in runs]
    med = lambda key: statistics.median(s[key] for s in sec)  # noqa: E731
    params = len(plain)
    bytes_stage = runs[0].stats["bytes_per_client"]
    return {
        "survivors": len(survivors),
        "dropped_clients": len(vectors) - len(survivors),
        "plaintext_s": plain_s,
        "masked_client_s": med("client_mean"),
        "masked_client_encode_s": med("client_encode_mean"),
        "masked_client_mask_s": med("client_mask_mean"),
        "masked_server_s": med("server"),
        "max_abs_error": float(max(np.abs(x.total - plain).max() for x in runs)),
        "bytes_per_client": bytes_stage,
        "bytes_per_client_total": runs[0].stats["bytes_per_client_total"],
        "expansion_factor_json": bytes_stage["masked_input"]["up"] / (4 * params),
        "expansion_factor_binary": 8.0 / 4.0,
    }


def run_secagg_bench(
    clients: int = 10,
    params: int = 1_000_000,
    dropout: float = 0.3,
    repeats: int = 3,
    neighbours: int | None = None,
    seed: int = 0,
) -> dict:
    """Time plaintext vs masked summation of ``clients`` float32 vectors of ``params`` elements.

    The dropout run silences ``round(dropout * clients)`` clients after they shared their keys and
    before their masked input (the costliest case for the server). Threshold: a strict majority.
    """
    rng = np.random.default_rng(seed)
    vectors = {i: rng.uniform(-1, 1, params).astype(np.float32) for i in range(1, clients + 1)}
    threshold = max(2, clients // 2 + 1)
    enc = FixedPointEncoder()
    enc_times = []
    for v in list(vectors.values())[: max(1, min(clients, 3))]:
        t0 = time.perf_counter()
        enc.encode(v)
        enc_times.append(time.perf_counter() - t0)
    encode_s = statistics.median(enc_times)
    base = _masked_run(vectors, threshold, None, repeats, neighbours)
    n_drop = int(round(dropout * clients))
    if clients - n_drop < threshold:
        raise ValueError(f"--dropout {dropout}: {clients - n_drop} survivors is below threshold {threshold}")
    plan = DropoutPlan({"masked_input": frozenset(range(2, 2 + n_drop))})
    drop = _masked_run(vectors, threshold, plan, repeats, neighbours)
    out = {
        "clients": clients,
        "params": params,
        "threshold": threshold,
        "neighbours": neighbours,
        "repeats": repeats,
        "frac_bits": enc.frac_bits,
        "encode_s": encode_s,
        **base,
        "ratios": {
            "client_masked_over_encode": base["masked_client_s"] / encode_s,
            "client_masked_over_encode_inside_protocol": base["masked_client_s"] / base["masked_client_encode_s"],
            "masked_total_over_plaintext": (clients * base["masked_client_s"] + base["masked_server_s"]) / base["plaintext_s"],
            "server_over_plaintext": base["masked_server_s"] / base["plaintext_s"],
            "server_dropout_over_no_dropout": drop["masked_server_s"] / base["masked_server_s"],
            "client_dropout_over_no_dropout": drop["masked_client_s"] / base["masked_client_s"],
        },
        "dropout": {"fraction": dropout, **drop},
    }
    return out


def write_json(result: dict, path: str | Path) -> None:
    """Write the benchmark dict as indented JSON."""
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def print_secagg_table(result: dict, console=None) -> None:
    """Render the benchmark dict as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = f"secagg masking: {result['clients']} clients x {result['params']:,} params (t={result['threshold']})"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("no dropout", justify="right")
    table.add_column(f"{result['dropout']['fraction']:.0%} dropout", justify="right")
    d = result["dropout"]
    rows = [
        ("plaintext sum (s)", "plaintext_s", "{:.4f}"),
        ("masked: client, per client (s)", "masked_client_s", "{:.4f}"),
        ("  of which encode (s)", "masked_client_encode_s", "{:.4f}"),
        ("  of which masks (s)", "masked_client_mask_s", "{:.4f}"),
        ("masked: server (s)", "masked_server_s", "{:.4f}"),
        ("max |error| vs plaintext", "max_abs_error", "{:.2e}"),
        ("bytes/client, all stages", "bytes_per_client_total", "{:,.0f}"),
        ("expansion (JSON vs float32)", "expansion_factor_json", "{:.2f}x"),
        ("survivors", "survivors", "{}"),
    ]
    for label, key, fmt in rows:
        table.add_row(label, fmt.format(result[key]), fmt.format(d[key]))
    for stage, b in result["bytes_per_client"].items():
        db = d["bytes_per_client"][stage]
        table.add_row(f"bytes/client {stage} (up/down)", f"{b['up']:,.0f} / {b['down']:,.0f}",
                      f"{db['up']:,.0f} / {db['down']:,.0f}")
    for k, v in result["ratios"].items():
        table.add_row(f"ratio {k}", f"{v:.2f}x", "")
    console.print(table)
