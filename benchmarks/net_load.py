"""Load run: N client processes complete one masked round over loopback mTLS; round time + server peak RSS.

``python -m fedproxy_benchmarks.net_load --clients 50 --dim 64 --out runs/net_load.json``
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.net_helpers import make_server, start_client, start_server, stop  # noqa: E402


def run(n: int, dim: int, out: str | None) -> dict:
    """Run one masked round with ``n`` client processes; returns the measured figures."""
    tmp = Path(tempfile.mkdtemp(prefix="netload"))
    d, port = make_server(tmp, n, rounds=1, min_clients=n, threshold=max(2, n // 2 + 1), dim=dim,
                          deadlines={"join": 300, "advertise": 300, "share": 120, "masked_input": 120,
                                     "consistency": 120, "unmask": 120})
    srv = start_server(d, port)
    ps = psutil.Process(srv.pid)
    peak = 0
    t0 = time.time()
    clients = [start_client(d, i, tmp) for i in range(n)]
    while any(c.poll() is None for c in clients) and time.time() - t0 < 900:
        peak = max(peak, ps.memory_info().rss)
        time.sleep(0.2)
    for c in clients:
        stop(c)
    peak = max(peak, ps.memory_info().rss)
    stop(srv)
    con = sqlite3.connect(d / "state.db")
    rid, status, opened, closed, result = con.execute(
        "SELECT round_id,status,opened_at,closed_at,result FROM rounds ORDER BY round_id LIMIT 1").fetchone()
    tr = {s: ts for s, ts in con.execute("SELECT stage, ts FROM transitions WHERE round_id=?", (rid,))}
    res = {"clients": n, "dim": dim, "status": status, "survivors": len(json.loads(result)["survivors"]) if result else 0,
           "round_seconds_open_to_close": round(closed - opened, 2) if closed else None,
           "protocol_seconds_advertise_to_close": round(closed - tr["advertise"], 2) if closed and "advertise" in tr else None,
           "wall_seconds_incl_process_start": round(time.time() - t0, 2), "server_peak_rss_mib": round(peak / 2**20, 1)}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--out", default="runs/net_load.json")
    a = ap.parse_args()
    print(json.dumps(run(a.clients, a.dim, a.out), indent=2))
