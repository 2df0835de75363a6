"""Supply chain: the hash-pinned lock files that ``make`` installs from, and ``fedproxy-secure sbom``
(a CycloneDX 1.5 SBOM of the installed environment, validated against the official JSON schema)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from fedproxy_secure.audit.sbom import (installed_distributions, normalise, read_lock_hashes, runtime_closure,
                                        validate_sbom_json, write_sbom)
from fedproxy_secure.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
TEST_LOCK = ROOT / "requirements-test.lock"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def lock() -> dict:
    return read_lock_hashes(LOCK)


def test_lock_pins_every_runtime_dependency_with_hashes(lock):
    versions = {n: v for n, v in lock}
    assert len(versions) == len(lock)  # one pin per distribution
    for (name, version), hashes in lock.items():
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name
    for line in _pyproject()["project"]["dependencies"]:
        req = Requirement(line)
        name = normalise(req.name)
        assert name in versions, f"{name} is a runtime dependency but not in requirements.lock (run make lock)"
        assert req.specifier.contains(versions[name], prereleases=True), (name, versions[name], str(req.specifier))
    # torch is the local CPU build, pinned with its local version label (a plain 'torch' is the CUDA build)
    assert versions["torch"].endswith("+cpu")


def test_lock_is_the_tested_environment(lock):
    """Every distribution fedproxy-secure needs at run time is installed at exactly the locked version."""
    dists = installed_distributions()
    needed = runtime_closure(dists) - {"fedproxy-secure"}
    versions = {n: v for n, v in lock}
    missing = sorted(needed - set(versions))
    assert missing == [], f"installed runtime dependencies missing from requirements.lock: {missing}"
    drift = {n: (dists[n].version, versions[n]) for n in needed if dists[n].version != versions[n]}
    assert drift == {}, f"installed != locked: {drift}"


def test_test_lock_adds_only_pinned_hashed_tools(lock):
    test = read_lock_hashes(TEST_LOCK)
    assert all(h for h in test.values())
    names = {n for n, _ in test}
    for line in _pyproject()["project"]["optional-dependencies"]["test"]:
        assert normalise(Requirement(line).name) in names, line
    both = {n: v for n, v in lock} | {}
    clash = {n: (both[n], v) for n, v in test if n in both and both[n] != v}
    assert clash == {}, clash  # the two files never pin one distribution twice differently


def test_makefile_installs_from_the_locks_with_hashes():
    mk = (ROOT / "Makefile").read_text()
    recipe = mk[mk.index("$(STAMP):"):mk.index("venv: $(STAMP)")]
    assert "--require-hashes" in recipe and "$(LOCK)" in recipe and "$(TEST_LOCK)" in recipe
    assert re.search(r"^LOCK := requirements\.lock$", mk, re.M) and re.search(r"^TEST_LOCK := requirements-test\.lock$",
                                                                                mk, re.M)
    # the project itself is installed without resolving anything outside the locks
    assert "--no-deps --no-build-isolation -e ." in recipe
    assert "lock:" in mk  # the documented way to refresh the pins


def test_lock_parser_reads_continuations_and_refuses_empty(tmp_path):
    p = tmp_path / "r.lock"
    p.write_text("# comment\nfoo-bar==1.2 \\\n    --hash=sha256:" + "a" * 64 + " \\\n    --hash=sha256:" + "b" * 64
                 + "\n    # via x\nBaz_Q[extra]==3.0+cpu --hash=sha256:" + "c" * 64 + "\n")
    assert read_lock_hashes(p) == {("foo-bar", "1.2"): ("a" * 64, "b" * 64), ("baz-q", "3.0+cpu"): ("c" * 64,)}
    p.write_text("# nothing pinned\nfoo>=1\n")
    with pytest.raises(ConfigError, match="--lock"):
        read_lock_hashes(p)
    with pytest.raises(ConfigError, match="--lock"):
        read_lock_hashes(tmp_path / "missing.lock")


@pytest.fixture(scope="module")
def sbom(tmp_path_factory, lock) -> dict:
    out = tmp_path_factory.mktemp("sbom") / "sbom.json"
    r = subprocess.run([sys.executable, "-m", "fedproxy_secure.cli.main", "sbom", "--out", str(out), "--lock", str(LOCK)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "schema-valid" in " ".join(r.stdout.split())
    return json.loads(out.read_text())


def test_sbom_is_valid_cyclonedx_1_5_with_required_fields(sbom):
    assert validate_sbom_json(json.dumps(sbom)) is None
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.5" and sbom["version"] >= 1
    assert re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", sbom["serialNumber"])
    root = sbom["metadata"]["component"]
    assert root["name"] == "fedproxy-secure" and root["version"] == metadata.version("fedproxy-secure")
    assert root["type"] == "application"
    refs = [c["bom-ref"] for c in sbom["components"]]
    assert len(refs) == len(set(refs))
    for c in sbom["components"]:
        assert c["type"] == "library" and c["name"] and c["version"]
        assert c["purl"] == f"pkg:pypi/{c['name']}@{c['version']}".replace("+", "%2B")
        assert c["version"] == metadata.version(c["name"]), c["name"]


def test_sbom_scopes_graph_and_lock_hashes(sbom, lock):
    by_name = {c["name"]: c for c in sbom["components"]}
    for line in _pyproject()["project"]["dependencies"]:
        name = normalise(Requirement(line).name)
        assert by_name[name]["scope"] == "required", name
    assert by_name["pytest"]["scope"] == "optional"  # a test tool, not needed at run time
    deps = {d["ref"]: set(d.get("dependsOn", [])) for d in sbom["dependencies"]}
    root_ref = sbom["metadata"]["component"]["bom-ref"]
    assert by_name["cryptography"]["bom-ref"] in deps[root_ref] and by_name["torch"]["bom-ref"] in deps[root_ref]
    assert all(r in deps for targets in deps.values() for r in targets)  # no dangling reference
    hashed = 0
    for c in sbom["components"]:
        want = lock.get((c["name"], c["version"]), ())
        got = tuple(h["content"] for h in c.get("hashes", []))
        assert set(got) == set(want), c["name"]
        hashed += bool(got)
    assert hashed >= len(_pyproject()["project"]["dependencies"])


def test_sbom_refuses_to_overwrite_and_validator_catches_a_broken_document(tmp_path, sbom):
    out = tmp_path / "sbom.json"
    out.write_text("{}")
    with pytest.raises(ConfigError, match="--out"):
        write_sbom(out)
    assert out.read_text() == "{}"
    broken = json.loads(json.dumps(sbom))
    del broken["components"][0]["type"]
    assert validate_sbom_json(json.dumps(broken)) is not None


def test_dedupe_removes_entries_the_runtime_lock_pins_and_keeps_the_rest(tmp_path):
    from fedproxy_secure.audit.lockfile import dedupe_text

    h = "--hash=sha256:" + "d" * 64
    text = (f"# header\n#\nalpha==1 \\\n    {h}\n    # via x\nbeta==2 \\\n    {h}\n    # via -r in\n"
            f"Gamma_Z==3 \\\n    {h}\n")
    new, removed = dedupe_text(text, {"alpha", "gamma-z"}, "requirements.lock")
    assert removed == ["alpha", "gamma-z"]
    body = [line for line in new.splitlines() if not line.strip().startswith("#")]
    assert body == ["beta==2 \\", f"    {h}"]  # beta's block intact, the others gone with their hashes
    again, removed2 = dedupe_text(new, {"alpha", "gamma-z"}, "requirements.lock")
    assert removed2 == [] and again == new  # idempotent, the note is added once
