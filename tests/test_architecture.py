"""Architecture rules (pyproject.toml [tool.importlinter]) hold, and a rule-breaking import is caught.

The contracts: the SDK never imports the CLI; client and server never import each other; client
never imports fuse; aggregate, secagg and protocol never import transport or server; secagg never
imports transformers or peft; compress and fuse never import client; only the CLI imports
``fedproxy_secure.bench``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _copy_package(dst: Path) -> Path:
    shutil.copytree(ROOT / "fedproxy_secure", dst / "fedproxy_secure",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst / "fedproxy_secure"


def test_import_contracts_hold() -> None:
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout
    assert "client and server never import each other KEPT" in r.stdout


def test_deliberately_bad_imports_break_the_named_contracts(tmp_path: Path) -> None:
    """A copy of the package with a client module importing the server and the protocol importing
    transport: lint-imports fails and names both contracts and both offending imports."""
    pkg = _copy_package(tmp_path)
    for rel, line in [("client/upload.py", "import fedproxy_secure.server.store"),
                      ("protocol/codec.py", "import fedproxy_secure.transport.signing")]:
        mod = pkg / rel
        mod.write_text(mod.read_text() + f"\n{line}  # deliberately bad\n")
    r = _lint(tmp_path)
    assert r.returncode != 0
    assert "client and server never import each other BROKEN" in r.stdout, r.stdout[-3000:]
    assert "fedproxy_secure.client.upload -> fedproxy_secure.server.store" in r.stdout
    assert "aggregate, secagg and protocol never import transport or server BROKEN" in r.stdout
    n_contracts = (ROOT / "pyproject.toml").read_text().count("[[tool.importlinter.contracts]]")
    assert f"Contracts: {n_contracts - 2} kept, 2 broken." in r.stdout  # the two named, and no other
