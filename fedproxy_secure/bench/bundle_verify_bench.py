"""Benchmark: how much SHA-256 verification adds on top of just reading a bundle's files.

Builds a synthetic bundle (a valid safetensors file of random bytes of ``size_mb`` MB plus small
JSON files), signs it, then times, ``repeats`` times each and interleaved, with a warm page cache:

* ``read_only``   - read every file in 1 MiB chunks, no hashing;
* ``read_hash``   - the same reads streamed through SHA-256 (``bundle.hash_stream``);
* ``verify``      - the full ``verify_bundle`` (signature, keyset, tree walk, hashes, headers);
* ``verify_copy`` - ``verify_bundle(copy_to=...)``, the loader's hash-while-copying path (once).

Reports medians; "hashing overhead" = verify - read_only.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import struct
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedproxy_secure.artifacts import create_keyset, generate_key, issue_bundle, verify_bundle
from fedproxy_secure.artifacts.bundle import CHUNK, hash_stream

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _write_proxy(folder: Path, size_bytes: int) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    (folder / "fedproxy.json").write_text(json.dumps({"base_model_hash": "sha256:" + "00" * 32}))
    header = json.dumps({"w": {"dtype": "U8", "shape": [size_bytes], "data_offsets": [0, size_bytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        left = size_bytes
        while left:
            n = min(left, 8 * CHUNK)
            fh.write(os.urandom(n))
            left -= n


def _read_only(bundle: Path) -> int:
    buf = bytearray(CHUNK)
    total = 0
    for p in sorted(bundle.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
    return total


def _read_hash(bundle: Path) -> int:
    total = 0
    for p in sorted(bundle.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as fh:
                total += hash_stream(fh)[0]
    return total


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_bench(size_mb: int = 270, repeats: int = 3, workdir: Path | None = None, out: Path | None = None) -> dict[str, Any]:
    """Build, sign and time a ``size_mb`` MB bundle; return (and optionally write) the figures in seconds."""
    tmp = Path(tempfile.mkdtemp(prefix="bundle-bench-", dir=workdir))
    try:
        key = generate_key()
        ks = create_keyset(key, name="bench", now=NOW)
        _write_proxy(tmp / "proxy", size_mb * 1_000_000)
        t_issue = _timed(lambda: issue_bundle(tmp / "proxy", key, version=1, valid_days=30, out_dir=tmp / "bundle", now=NOW))
        shutil.rmtree(tmp / "proxy")
        b = tmp / "bundle"
        total = _read_only(b)  # warm the page cache
        runs: dict[str, list[float]] = {"read_only": [], "read_hash": [], "verify": []}
        for _ in range(repeats):
            runs["read_only"].append(_timed(lambda: _read_only(b)))
            runs["read_hash"].append(_timed(lambda: _read_hash(b)))
            runs["verify"].append(_timed(lambda: verify_bundle(b, ks, now=NOW)))
        copy_dir = tmp / "copy"
        copy_dir.mkdir(mode=0o700)
        t_copy = _timed(lambda: verify_bundle(b, ks, now=NOW, copy_to=copy_dir))
        med = {k: statistics.median(v) for k, v in runs.items()}
        res = {
            "bytes": total,
            "repeats": repeats,
            "page_cache": "warm",
            "chunk_bytes": CHUNK,
            "issue_s": t_issue,
            "runs_s": runs,
            "median_s": med,
            "verify_copy_s": t_copy,
            "hash_overhead_s": med["verify"] - med["read_only"],
            "hash_MBps": total / 1e6 / max(med["read_hash"] - med["read_only"], 1e-9),
            "cpu": os.cpu_count(),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
    return res


def print_table(res: dict[str, Any], console=None) -> None:
    """Render the figures of :func:`run_bench` with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"bundle verification, {res['bytes'] / 1e6:.0f} MB, median of {res['repeats']} (warm cache)")
    t.add_column("step")
    t.add_column("seconds", justify="right")
    t.add_column("MB/s", justify="right")
    mb = res["bytes"] / 1e6
    for name, label in [("read_only", "read only"), ("read_hash", "read + SHA-256"), ("verify", "verify_bundle (full)")]:
        s = res["median_s"][name]
        t.add_row(label, f"{s:.3f}", f"{mb / s:.0f}")
    t.add_row("verify_bundle + private copy (once)", f"{res['verify_copy_s']:.3f}", f"{mb / res['verify_copy_s']:.0f}")
    t.add_row("hashing overhead (verify - read only)", f"{res['hash_overhead_s']:.3f}", "")
    console.print(t)
