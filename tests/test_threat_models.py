"""threat_models/: schema, cited tests and mitigations exist, index and SECURITY.md stay in step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedproxy_secure.audit.controls import CONTROLS
from fedproxy_secure.audit.threats import (ADVERSARIES, ASSETS, collect_test_ids, load_threat_model,
                                           load_threat_models, missing_references)
from fedproxy_secure.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TM = ROOT / "threat_models"


@pytest.fixture(scope="module")
def models():
    return load_threat_models(TM)


def test_threat_model_files_match_schema(models) -> None:
    assert len(models) >= 15
    assert [m.id for m in models] == sorted({m.id for m in models})
    for m in models:
        assert m.tests and m.mitigation and m.attack.references


def test_every_cited_test_id_exists_and_every_mitigation_is_real(models) -> None:
    problems = missing_references(models, ROOT)
    assert problems == [], "\n".join(problems)


def test_missing_test_id_or_function_is_reported(models, tmp_path: Path) -> None:
    m = models[0].model_copy(update={"tests": ["tests/test_secagg_shamir.py::test_does_not_exist"]})
    assert any("does not exist in the suite" in p for p in missing_references([m], ROOT))
    mit = models[0].mitigation[0].model_copy(update={"function": "no_such_function"})
    m = models[0].model_copy(update={"mitigation": [mit]})
    assert any("defines no no_such_function" in p for p in missing_references([m], ROOT))


def test_collector_agrees_with_pytest_collection(tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_demo.py").write_text(
        "import pytest\n\n"
        "def test_plain():\n    assert True\n\n"
        "@pytest.mark.parametrize('x', [1, 2])\ndef test_param(x):\n    assert x\n\n"
        "class TestGroup:\n    def test_method(self):\n        assert True\n\n"
        "def helper():\n    pass\n")
    ids = collect_test_ids(tests, tmp_path)
    assert ids == {"tests/test_demo.py::test_plain", "tests/test_demo.py::test_param",
                   "tests/test_demo.py::TestGroup::test_method"}
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60).stdout
    collected = {line.split("[")[0] for line in out.splitlines() if "::" in line}
    assert collected == ids


BAD = [
    ("missing-tests", {"tests": []}, "tests"),
    ("bad-test-id", {"tests": ["test_x::y"]}, "pytest node id"),
    ("bad-adversary", {"adversary": ["aliens"]}, "adversary"),
    ("bad-asset", {"asset": ["the moon"]}, "asset"),
    ("no-category", {"category": {"stride": [], "linddun": []}}, "category"),
    ("bad-stride", {"category": {"stride": ["Spoofy"]}}, "category"),
    ("no-references", {"attack": {"summary": "x" * 30, "references": []}}, "references"),
    ("extra-field", {"likelihood": "high"}, "likelihood"),
    ("bad-severity", {"severity": "severe"}, "severity"),
    ("bad-id", {"id": "X1"}, "id"),
]


@pytest.mark.parametrize("patch,needle", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_schema_rejects_bad_files(tmp_path: Path, patch: dict, needle: str) -> None:
    good = yaml.safe_load(next(TM.glob("t01-*.yaml")).read_text())
    p = tmp_path / "t01-x.yaml"
    p.write_text(yaml.safe_dump({**good, **patch}))
    with pytest.raises(ConfigError, match=needle):
        load_threat_model(p)


def test_every_threat_has_a_severity(models, tmp_path: Path) -> None:
    from fedproxy_secure.audit.threats import SEVERITIES

    assert SEVERITIES == ("low", "medium", "high", "critical")
    assert all(m.severity in SEVERITIES for m in models)
    assert {m.severity for m in models} >= {"medium", "high", "critical"}  # a real spread, not one default
    good = yaml.safe_load(next(TM.glob("t01-*.yaml")).read_text())
    del good["severity"]
    p = tmp_path / "t01-x.yaml"
    p.write_text(yaml.safe_dump(good))
    with pytest.raises(ConfigError, match="severity"):
        load_threat_model(p)


def test_file_name_and_duplicate_ids_refused(tmp_path: Path) -> None:
    text = next(TM.glob("t01-*.yaml")).read_text()
    (tmp_path / "t02-wrong.yaml").write_text(text)
    with pytest.raises(ConfigError, match="file name must start"):
        load_threat_model(tmp_path / "t02-wrong.yaml")
    (tmp_path / "t02-wrong.yaml").unlink()
    (tmp_path / "t01-a.yaml").write_text(text)
    (tmp_path / "t01-b.yaml").write_text(text)
    with pytest.raises(ConfigError, match="duplicate"):
        load_threat_models(tmp_path)


def test_coverage_of_adversaries_assets_and_required_attacks(models) -> None:
    assert {a for m in models for a in m.adversary} == set(ADVERSARIES)
    assert {a for m in models for a in m.asset} == set(ASSETS)
    text = " ".join(f"{m.title} {m.attack.summary} {' '.join(m.attack.references)}" for m in models).lower()
    for needle in ("dager", "membership inference", "property", "backdoor", "sybil", "free-rid", "replay",
                   "model inconsistency", "offsite-tuning", "ind-cpa-d", "32-bit"):
        assert needle in text, needle


def test_controls_and_threats_cross_reference(models) -> None:
    from fedproxy_secure.audit.check import deployment_from_network
    from fedproxy_secure.audit.controls import evaluate

    ids = {m.id for m in models}
    dep, _ = deployment_from_network({"clients": 3, "federation": {"mode": "masking"}}, "x")
    by_control = {f.control: set(f.threats) for f in evaluate(dep)}
    for m in models:
        for c in m.controls:
            assert c in CONTROLS, (m.id, c)
            assert m.id in by_control[c], (m.id, c)
    for c, threats in by_control.items():
        assert threats <= ids, (c, threats - ids)
        for t in threats:
            assert c in next(m for m in models if m.id == t).controls, (c, t)


def test_index_lists_every_threat(models) -> None:
    index = (TM / "index.md").read_text()
    assert "```mermaid" in index
    for m in models:
        assert f"| {m.id} |" in index and m.title in index, m.id
        f = next(TM.glob(f"{m.id.lower()}-*.yaml")).name
        assert f"| {m.id} | [{m.title}]({f}) | {m.severity} |" in index, m.id  # severity column in step


def test_security_md_has_required_sections_and_figures() -> None:
    text = (ROOT / "SECURITY.md").read_text()
    for heading in ("## Supported versions", "## Reporting a vulnerability", "## Proxy bundle signing",
                    "## Residual risks", "### Masking", "### Homomorphic encryption", "### Differential privacy"):
        assert heading in text, heading
    for fact in ("81,413,568", "134,515,008", "60.5%", "example-level", "not verifiable", "server + one",
                 "audit check"):
        assert fact in text, fact
