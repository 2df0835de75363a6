"""Helpers for network tests: a real server process and client processes on loopback TLS."""

from __future__ import annotations

import base64
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def masking_settings(**overrides) -> dict:
    """A small masking federation's settings (3 sites, t = 2, dim 8, short deadlines) with ``overrides``."""
    base = dict(rounds=2, min_clients=3, threshold=2, mode="masking", dim=8, clip_norm=1.0,
                deadlines={"join": 20, "advertise": 20, "share": 6, "masked_input": 6, "consistency": 6, "unmask": 6})
    return base | overrides


def make_server(tmp: Path, n_sites: int, **settings) -> tuple[Path, int]:
    from fedproxy_secure.protocol.settings import FederationSettings
    from fedproxy_secure.server.setup import enroll_site, init_server

    port = free_port()
    d = tmp / "srv"
    init_server(d, FederationSettings.from_dict(masking_settings(**settings)))
    for i in range(n_sites):
        enroll_site(d, f"site{i}", f"https://127.0.0.1:{port}")
    return d, port


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def start_server(d: Path, port: int, extra: list[str] | None = None) -> subprocess.Popen:
    log = open(d / "server.log", "ab")
    p = subprocess.Popen([PY, "-m", "fedproxy_secure.server.runner", str(d), "--port", str(port), "--poll", "2",
                          *(extra or [])], cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)
    t_end = time.time() + 30
    while time.time() < t_end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return p
        except OSError:
            if p.poll() is not None:
                raise RuntimeError((d / "server.log").read_text())
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def start_client(d: Path, i: int, tmp: Path, die_at: str | None = None, port: int | None = None,
                 extra: list[str] | None = None) -> subprocess.Popen:
    cmd = [PY, "-m", "fedproxy_secure.client.join_main", "--enrol", str(d / "enrol" / f"site{i}"),
           "--state", str(tmp / f"client{i}"), "--seed", str(i), "--out", str(tmp / f"client{i}.json")]
    if die_at:
        cmd += ["--die-at", die_at]
    cmd += extra or []
    log = open(tmp / f"client{i}.log", "ab")
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)


def roster_policy(tmp: Path, n_sites: int, **policy) -> Path:
    """Make each site's identity key in its state folder (``tmp/client{i}``) before its first join, as a site
    does before exchanging fingerprints, and write a policy file whose roster lists all of them (with
    ``policy`` overrides). Pass it to :func:`start_client` as ``extra=["--policy", str(path)]``."""
    import json

    from fedproxy_secure.artifacts.keys import generate_key, load_private_key, save_private_key
    from fedproxy_secure.protocol.roster import identity_fingerprint

    fps = []
    for i in range(n_sites):
        st = tmp / f"client{i}"
        st.mkdir(parents=True, exist_ok=True)
        if (st / "identity.key").exists():  # made earlier by the test (it needed the key first)
            key = load_private_key(st / "identity.key")
        else:
            key = generate_key()
            save_private_key(key, st / "identity.key")
        fps.append(identity_fingerprint(key.public_key().public_bytes_raw()))
    path = tmp / "roster-policy.json"
    path.write_text(json.dumps({"roster": fps, **policy}))
    return path


def db_rounds(d: Path) -> list[tuple]:
    con = sqlite3.connect(f"file:{d / 'state.db'}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute("SELECT round_id, status, stage, result FROM rounds ORDER BY round_id").fetchall()
    finally:
        con.close()


def wait_for(pred, timeout: float, what: str):
    t_end = time.time() + timeout
    while time.time() < t_end:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def expected_sum(seeds, round_id: int, dim: int, clip: float = 1.0) -> np.ndarray:
    from fedproxy_secure.client.join import clip_update, synthetic_train_fn

    return sum(clip_update(synthetic_train_fn(s, 0.1)(np.zeros(dim), {"round_id": round_id})[0], clip) for s in seeds)


def result_sum(result_json: str) -> np.ndarray:
    import json

    return np.frombuffer(base64.b64decode(json.loads(result_json)["sum_b64"]), "<f8")


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def short_demo_config(example: str, tmp_path: Path, timeout_s: float | None = None, **eval_overrides) -> Path:
    """Write ``examples/<example>`` shortened for the suite (2 rounds, 10 test examples per task, the
    offline bigbench-mini data, no proxy evaluation, no non-DP baseline unless ``eval_overrides`` say
    so) to ``tmp_path/demo.yaml``; return its path."""
    import yaml

    cfg = yaml.safe_load((ROOT / "examples" / example).read_text())
    cfg["federation"]["rounds"] = 2
    cfg["data"]["limit_test"] = 10
    cfg["data"]["dir"] = str(ROOT / "examples" / "data" / "bigbench-mini")
    cfg["eval"]["proxy"] = False
    cfg["eval"]["no_dp_baseline"] = False
    cfg["eval"].update(eval_overrides)
    if timeout_s is not None:
        cfg["timeout_s"] = timeout_s
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "demo.yaml"


def demo_cmd(config: Path, out: Path) -> list[str]:
    """The ``demo --config F --out DIR`` command line."""
    return [sys.executable, "-m", "fedproxy_secure.cli.main", "demo", "--config", str(config), "--out", str(out)]


def run_short_demo(example: str, tmp_path: Path, timeout: float, **eval_overrides) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``demo --config examples/<example>`` shortened by :func:`short_demo_config`; returns the
    process and the output folder."""
    cfg = short_demo_config(example, tmp_path, **eval_overrides)
    out = tmp_path / "demo"
    r = subprocess.run(demo_cmd(cfg, out), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    return r, out
