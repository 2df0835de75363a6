"""Packaging: the wheel alone (no source tree) gives a working ``fedproxy-secure`` with its sizing benches.

The wheel is built from this checkout and installed into a fresh venv outside the repository. The
third-party dependencies are borrowed from the test environment through a ``.pth`` line naming a folder of
links to that site-packages' entries, minus matplotlib (the optional ``[plots]`` extra) and this checkout's
own installs; a ``.pth`` line adds a folder to ``sys.path`` without running its ``.pth`` files, so the editable
installs of this checkout (the SDK and ``benchmarks/``) stay invisible: every ``fedproxy_secure`` module must
come from the installed wheel, and the research commands must say they need a checkout.
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


#: site-packages entries the fresh venv does not borrow: the [plots] extra and this checkout's editable installs
NOT_BORROWED = ("matplotlib", "mpl_toolkits", "pylab", "fedproxy", "__editable__")


def _borrowed_deps(folder: Path) -> Path:
    """A folder of links to the test environment's site-packages entries, without :data:`NOT_BORROWED`."""
    folder.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(NOT_BORROWED):
            (folder / entry.name).symlink_to(entry)
    return folder


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
    (fresh_site / "borrowed_deps.pth").write_text(f"{_borrowed_deps(tmp_path / 'deps')}\n")
    inst = _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheels[0]], cwd=tmp_path)
    assert inst.returncode == 0, inst.stderr[-2000:]

    where = _run([py, "-c", "import importlib.util as u, fedproxy_secure, fedproxy_secure.bench.secagg_bench as b; "
                  "print(fedproxy_secure.__file__); print(b.__file__); "
                  "assert u.find_spec('matplotlib') is None and u.find_spec('fedproxy_benchmarks') is None"],
                 cwd=tmp_path)
    assert where.returncode == 0, where.stderr[-2000:]
    for line in where.stdout.split():
        assert Path(line).resolve().is_relative_to(env_dir.resolve()), f"{line} is not from the installed wheel"
    # without matplotlib a plot is skipped with one logged line, not an error
    plot = _run([py, "-c", "from fedproxy_secure.report import plot_rounds; print(plot_rounds('r.png', {}))"], cwd=tmp_path)
    assert plot.returncode == 0 and plot.stdout.strip() == "None", plot.stderr[-2000:]
    assert "matplotlib is not installed" in plot.stderr and not (tmp_path / "r.png").exists()

    cli = env_dir / "bin" / "fedproxy-secure"
    helped = _run([cli, "--help"], cwd=tmp_path)
    assert helped.returncode == 0 and "server" in helped.stdout and "bench" in helped.stdout, helped.stderr[-2000:]
    for cmd, word in ((["client", "join"], "--server"), (["server", "start"], "--bundle")):
        h = _run([cli, *cmd, "--help"], cwd=tmp_path)
        assert h.returncode == 0 and word in h.stdout, (cmd, h.stdout[-2000:], h.stderr[-2000:])
    research = _run([cli, "bench", "aggregate"], cwd=tmp_path)
    lines = [ln for ln in (research.stdout + research.stderr).splitlines() if ln.strip()]
    assert research.returncode == 2 and len(lines) == 1 and "source checkout" in lines[0], research.stderr[-2000:]
    out = tmp_path / "secagg.json"
    bench = _run([cli, "bench", "secagg", "--clients", "3", "--params", "2000", "--dropout", "0", "--repeats", "1", "--json", out], cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr[-2000:]
    res = json.loads(out.read_text())
    assert (res["clients"], res["params"], res["survivors"]) == (3, 2000, 3)
