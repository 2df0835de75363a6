"""The research drivers live in the top-level benchmarks/ package (import name ``fedproxy_benchmarks``), outside
the SDK: the SDK keeps only the operator's sizing benches, the research commands say in ``--help`` that they need
a checkout and, without the package (a wheel installed elsewhere), fail with one line and exit 2; the
drivers use only public SDK names."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedproxy_secure.cli.main import _load_commands, app

ROOT = Path(__file__).resolve().parents[1]
_load_commands()

#: each research command with its required options (dummy values: the command stops before using them)
RESEARCH = {
    "quality": ["--llm", "x", "--out", "y"],
    "recipe": ["--llm", "x", "--grid", "g.yaml", "--out", "y"],
    "fusion": ["--llm", "x", "--out", "y"],
    "scale": [],
    "client-dp": ["--model", "x", "--data", "y"],
    "aggregate": [],
}


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_the_sdk_keeps_only_the_sizing_benches() -> None:
    assert sorted(p.name for p in (ROOT / "fedproxy_secure" / "bench").glob("*.py")) == [
        "__init__.py", "bundle_verify_bench.py", "he_bench.py", "secagg_bench.py"]
    assert not (ROOT / "fedproxy_secure" / "flower" / "scale.py").exists()
    import fedproxy_benchmarks

    assert Path(fedproxy_benchmarks.__file__).resolve().parent == ROOT / "benchmarks"


@pytest.mark.parametrize("command", sorted(RESEARCH))
def test_research_commands_say_they_need_a_checkout(command: str) -> None:
    r = CliRunner().invoke(app, ["bench", command, "--help"])
    assert r.exit_code == 0, r.output
    assert "Research command: runs from a source checkout" in _flat(r.output)


@pytest.mark.parametrize("command", sorted(RESEARCH))
def test_research_commands_without_the_benchmarks_package_fail_in_one_line(command: str, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "fedproxy_benchmarks", None)  # as if not installed: import raises
    r = CliRunner().invoke(app, ["bench", command, *RESEARCH[command]])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert "research command" in lines[0] and "source checkout" in lines[0] and "make venv" in lines[0]


def test_sizing_benches_run_without_the_benchmarks_package(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "fedproxy_benchmarks", None)
    out = tmp_path / "secagg.json"
    r = CliRunner().invoke(app, ["bench", "secagg", "--clients", "3", "--params", "200", "--dropout", "0",
                                 "--repeats", "1", "--json", str(out)])
    assert r.exit_code == 0 and out.is_file(), r.output
    r = CliRunner().invoke(app, ["bench", "--help"])
    assert r.exit_code == 0 and "Research commands" in r.output


def test_benchmarks_import_only_public_sdk_names() -> None:
    bad = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedproxy_secure"):
                parts = node.module.split(".") + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                parts = [p for a in node.names if a.name.startswith("fedproxy_secure") for p in a.name.split(".")]
            else:
                continue
            bad += [f"{path.name}:{node.lineno} {p}" for p in parts if p.startswith("_") and not p.startswith("__")]
    assert not bad, bad
