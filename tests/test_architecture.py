"""Architecture rules (pyproject.toml [tool.importlinter]) hold, and a rule-breaking import is caught.

The contracts: the SDK never imports the CLI; client and server never import each other; client
never imports fuse; aggregate, secagg and protocol never import transport or server; secagg never
imports transformers or peft; compress and fuse never import client; only the CLI imports
``fedproxy_secure.bench``; and one layers contract over every top-level package, from the CLI down
to the wire primitives, that counts imports made inside functions like any other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
LAYERS = "layers: from the CLI down to the wire primitives, nothing imports upward"


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _one_line(text: str) -> str:
    """lint-imports wraps long contract names: compare with runs of whitespace as one space."""
    return " ".join(text.split())


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
    transport: lint-imports fails and names both contracts and both offending imports (the layers
    contract breaks too: client and server are independent, transport sits beside protocol)."""
    pkg = _copy_package(tmp_path)
    for rel, line in [("client/upload.py", "import fedproxy_secure.server.store"),
                      ("protocol/names.py", "import fedproxy_secure.transport.signing")]:
        mod = pkg / rel
        mod.write_text(mod.read_text() + f"\n{line}  # deliberately bad\n")
    r = _lint(tmp_path)
    assert r.returncode != 0
    assert "client and server never import each other BROKEN" in r.stdout, r.stdout[-3000:]
    assert "fedproxy_secure.client.upload -> fedproxy_secure.server.store" in r.stdout
    assert "aggregate, secagg and protocol never import transport or server BROKEN" in r.stdout
    assert f"{LAYERS} BROKEN" in _one_line(r.stdout)
    n_contracts = len(_contracts())
    assert f"Contracts: {n_contracts - 3} kept, 3 broken." in r.stdout  # the two named and the layers, no other


def test_one_layers_contract_covers_every_top_level_package() -> None:
    """Exactly one layers contract, over the package's direct children, exhaustive (a new top-level
    package fails it until it is placed), with no ignored imports."""
    layers = [c for c in _contracts() if c["type"] == "layers"]
    assert len(layers) == 1 and layers[0]["name"] == LAYERS
    c = layers[0]
    assert c["containers"] == ["fedproxy_secure"] and c["exhaustive"] is True
    assert "ignore_imports" not in c and c["layers"][0] == "cli" and c["layers"][-2] == "wire"


@pytest.mark.parametrize("line", [
    "import fedproxy_secure.config  # deliberately upward",
    "def _lazy():\n    import fedproxy_secure.config  # deliberately upward, inside a function\n",
], ids=["module-level", "inside-a-function"])
def test_one_upward_import_breaks_the_layers_contract(tmp_path: Path, line: str) -> None:
    """A copy of the package whose threshold rule (wire, near the bottom) imports the run config (a
    layer above): lint-imports fails on the layers contract alone and names the import; an import
    inside a function counts like one at the top."""
    pkg = _copy_package(tmp_path)
    mod = pkg / "wire" / "threshold.py"
    mod.write_text(mod.read_text() + "\n" + line + "\n")
    r = _lint(tmp_path)
    out = _one_line(r.stdout)
    assert r.returncode != 0
    assert f"{LAYERS} BROKEN" in out, r.stdout[-3000:]
    assert "fedproxy_secure.wire.threshold -> fedproxy_secure.config" in out
    assert f"Contracts: {len(_contracts()) - 1} kept, 1 broken." in out
