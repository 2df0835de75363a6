"""Benchmark of the HE (CKKS) secure-aggregation mode: bytes and microseconds per value, error.

``run_he_bench`` returns a JSON-able dict; ``print_table`` renders it with rich. For each vector
size it runs one full round with ``clients`` clients through the real roles (KeyHolder ->
ClientEncryptor -> ServerAggregatorHE -> KeyHolder.decrypt_aggregate) on one thread, and compares
against NVFlare's default CKKS context (N = 8192, coeff [60, 40, 40], scale 2^40), measured here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import msgpack
import numpy as np
import tenseal as ts

from fedproxy_secure.secagg.he import ClientEncryptor, KeyHolder, ServerAggregatorHE, _chunk_sizes, _ckks_from
from fedproxy_secure.secagg.he_params import validate_params


def nvflare_default_figures(n_values: int = 100_000) -> dict:
    """NVFlare's default CKKS context (N = 8192, coeff [60, 40, 40], scale 2^40), raw TenSEAL:
    bytes and µs per value for encrypting, adding two clients and decrypting ``n_values`` values."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40], n_threads=1)
    ctx.global_scale = 2.0**40
    rng = np.random.default_rng(0)
    chunks = [rng.uniform(-1, 1, min(4096, n_values - i)).tolist() for i in range(0, n_values, 4096)]
    t0 = time.perf_counter()
    a = [ts.ckks_vector(ctx, c) for c in chunks]
    t1 = time.perf_counter()
    blobs = [v.serialize() for v in a]
    b = [ts.ckks_vector(ctx, c) for c in chunks]
    t2 = time.perf_counter()
    for u, v in zip(a, b):
        u.add_(v)
    t3 = time.perf_counter()
    for u in a:
        u.decrypt()
    t4 = time.perf_counter()
    return {
        "coeff_mod_bit_sizes": [60, 40, 40],
        "values": n_values,
        "bytes_per_value": sum(map(len, blobs)) / n_values,
        "bytes_per_value_full_ciphertext": len(blobs[0]) / 4096,
        "encrypt_us_per_value": (t1 - t0) / n_values * 1e6,
        "add_us_per_value": (t3 - t2) / n_values * 1e6,
        "decrypt_us_per_value": (t4 - t3) / n_values * 1e6,
    }


def bench_one(n_values: int, clients: int, encryption: str = "public", seed: int = 0) -> dict:
    """One round over ``clients`` random vectors of ``n_values`` values in [-1, 1]."""
    params = validate_params(encryption=encryption)
    rng = np.random.default_rng(seed)
    sid = f"bench-he/{n_values}".encode()
    t0 = time.perf_counter()
    kh = KeyHolder(params)
    server = ServerAggregatorHE(kh.public_descriptor())
    kh.server_public_key = server.public_key_bytes()
    setup_s = time.perf_counter() - t0
    enc = kh.encryptor() if encryption == "symmetric" else ClientEncryptor(kh.public_descriptor(), clip=1.0)
    enc.clip = 1.0

    server.start_round(sid, n_values)
    ref = np.zeros(n_values)
    t_enc = t_ingest = 0.0
    env_bytes = 0
    first_env = second_env = None
    for i in range(clients):
        x = rng.uniform(-1.0, 1.0, n_values)
        ref += x
        t1 = time.perf_counter()
        env = enc.encrypt(x, session_id=sid, client_id=i)
        t2 = time.perf_counter()
        server.submit(i, env)
        t3 = time.perf_counter()
        t_enc += t2 - t1
        t_ingest += t3 - t2
        env_bytes += len(env)
        if i == 0:
            first_env = env
        elif i == 1:
            second_env = env
    t4 = time.perf_counter()
    agg, statement, sig = server.finish(clients)
    finish_s = time.perf_counter() - t4

    # pure homomorphic addition: one client's ciphertexts into another's (parse time excluded)
    sizes = _chunk_sizes(n_values, params.slots)
    add_us = float("nan")
    if second_env is not None:
        a = [_ckks_from(server._ctx, b, params, s, "bench") for b, s in zip(msgpack.unpackb(first_env)["cts"], sizes)]
        b = [_ckks_from(server._ctx, c, params, s, "bench") for c, s in zip(msgpack.unpackb(second_env)["cts"], sizes)]
        t5 = time.perf_counter()
        for u, v in zip(a, b):
            u.add_(v)
        add_us = (time.perf_counter() - t5) / n_values * 1e6
        del a, b

    t6 = time.perf_counter()
    total = kh.decrypt_aggregate(agg, statement, sig, session_id=sid, threshold=clients)
    dec_s = time.perf_counter() - t6
    err = float(np.max(np.abs(total - ref)))
    return {
        "values": n_values,
        "clients": clients,
        "encryption": encryption,
        "params": params.to_json(),
        "ciphertexts_per_client": len(sizes),
        "bytes_per_value": env_bytes / clients / n_values,
        "bytes_per_client": env_bytes / clients,
        "aggregate_bytes": len(agg),
        "public_context_bytes": len(kh.public_descriptor()),
        "encrypt_us_per_value": t_enc / clients / n_values * 1e6,
        "add_us_per_value": add_us,
        "server_ingest_us_per_value": t_ingest / clients / n_values * 1e6,
        "server_finish_seconds": finish_s,
        "decrypt_us_per_value": dec_s / n_values * 1e6,
        "max_abs_error": err,
        "stated_tolerance": kh.flooding.tolerance(params, clients),
        "flood_sigma": kh.flooding.sigma(params, clients),
        "key_setup_seconds": setup_s,
        "round_seconds": time.perf_counter() - t0,
    }


def run_he_bench(values: list[int] | None = None, clients: int = 10, encryption: str = "public",
                 json_path: str | Path | None = None) -> dict:
    """Run :func:`bench_one` for each size; the top level repeats the largest size's figures."""
    values = values or [100_000, 1_000_000]
    runs = [bench_one(int(v), int(clients), encryption) for v in values]
    out = dict(runs[-1])
    out["runs"] = runs
    nv = nvflare_default_figures()
    out["nvflare_default"] = nv
    out["nvflare_default_bytes_per_value"] = nv["bytes_per_value_full_ciphertext"]
    out["threads"] = 1
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2))
    return out


def print_table(result: dict) -> None:
    """Render the benchmark result as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"HE secure aggregation (CKKS N=8192 [60,40] 2^40, {result['encryption']} key, 1 thread)")
    for col in ("values", "clients", "B/value", "enc µs/v", "add µs/v", "ingest µs/v", "dec µs/v", "max err", "stated tol"):
        table.add_column(col, justify="right")
    for r in result["runs"]:
        table.add_row(
            f"{r['values']:,}", str(r["clients"]), f"{r['bytes_per_value']:.2f}",
            f"{r['encrypt_us_per_value']:.3f}", f"{r['add_us_per_value']:.4f}",
            f"{r['server_ingest_us_per_value']:.3f}", f"{r['decrypt_us_per_value']:.3f}",
            f"{r['max_abs_error']:.2e}", f"{r['stated_tolerance']:.2e}",
        )
    console = Console(width=max(Console().width, 120))
    console.print(table)
    nv = result["nvflare_default"]
    console.print(
        f"NVFlare default context (coeff [60,40,40], raw TenSEAL, {nv['values']:,} values), measured here: "
        f"{nv['bytes_per_value_full_ciphertext']:.2f} B/value (full ciphertext), enc {nv['encrypt_us_per_value']:.3f}, "
        f"add {nv['add_us_per_value']:.4f}, dec {nv['decrypt_us_per_value']:.3f} µs/value"
    )
