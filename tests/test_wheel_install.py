"""Packaging: the wheel alone (no source tree) gives a working ``fedproxy-secure`` with its benchmarks.

The wheel is built from this checkout and installed into a fresh venv outside the repository. The
third-party dependencies are borrowed from the test environment through a ``.pth`` line, which
adds that site-packages folder to ``sys.path`` without running its ``.pth`` files, so the
editable install of this checkout stays invisible: every ``fedproxy_secure`` module must come from
the installed wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_installs_outside_the_repo_and_runs_help_and_bench_secagg(tmp_path):
    dist = tmp_path / "dist"
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, ROOT], cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    wheels = list(dist.glob("fedproxy_secure-*.whl"))
    assert len(wheels) == 1

    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    fresh_site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).stdout.strip())
    (fresh_site / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    inst = _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheels[0]], cwd=tmp_path)
    assert inst.returncode == 0, inst.stderr[-2000:]

    where = _run([py, "-c", "import fedproxy_secure, fedproxy_secure.bench.secagg_bench as b; print(fedproxy_secure.__file__); print(b.__file__)"],
                 cwd=tmp_path)
    assert where.returncode == 0, where.stderr[-2000:]
    for line in where.stdout.split():
        assert Path(line).resolve().is_relative_to(env_dir.resolve()), f"{line} is not from the installed wheel"

    cli = env_dir / "bin" / "fedproxy-secure"
    helped = _run([cli, "--help"], cwd=tmp_path)
    assert helped.returncode == 0 and "server" in helped.stdout and "bench" in helped.stdout, helped.stderr[-2000:]
    out = tmp_path / "secagg.json"
    bench = _run([cli, "bench", "secagg", "--clients", "3", "--params", "2000", "--dropout", "0", "--repeats", "1", "--json", out], cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr[-2000:]
    res = json.loads(out.read_text())
    assert (res["clients"], res["params"], res["survivors"]) == (3, 2000, 3)
