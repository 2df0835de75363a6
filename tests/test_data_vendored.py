"""The vendored BIG-bench tasks: exactly the 14 tasks, unchanged (SHA-256 manifest), canaries kept,
license shipped, in the wheel; and the one resolution order of data/resolve.py, with the network
blocked so any download attempt fails the test."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedproxy_secure.data import load_task
from fedproxy_secure.data import resolve as R
from fedproxy_secure.data.manifest import MANIFEST_NAME, file_sha256, read_manifest, verify_manifest, write_manifest
from fedproxy_secure.errors import ConfigError, SecurityError
from tests.artifacts_helpers import flip_byte

ROOT = Path(__file__).resolve().parents[1]
DEV = ("intent_recognition", "metaphor_boolean", "navigate", "presuppositions_as_nli", "social_support",
       "sports_understanding", "strategyqa", "winowhy")
SKILL = ("discourse_marker_prediction", "implicatures", "reasoning_about_colored_objects", "ruin_names",
         "salient_translation_error_detection", "temporal_sequences")
MINI = ROOT / "examples" / "data" / "bigbench-mini"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every name lookup or connect attempt is recorded and refused."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    return attempts


def test_vendored_tree_matches_its_manifest_and_holds_exactly_the_14_tasks() -> None:
    verify_manifest(R.VENDORED_ROOT)  # the test fails if any vendored file changed by one byte
    listed = read_manifest(R.VENDORED_ROOT)
    assert {p for p in listed if p.endswith(".json")} == (
        {f"bigbench/{t}.json" for t in DEV} | {f"bigbench-skill/{t}.json" for t in SKILL})
    assert {"LICENSE-bigbench-Apache-2.0.txt", "README.md", "bigbench/README.md", "bigbench-skill/README.md"} <= set(listed)
    assert R.vendored_tasks("bigbench") == DEV and R.vendored_tasks("bigbench-skill") == SKILL


def test_vendored_files_keep_canary_license_and_source() -> None:
    for vset, names in (("bigbench", DEV), ("bigbench-skill", SKILL)):
        for t in names:
            task = json.loads((R.VENDORED_ROOT / vset / f"{t}.json").read_text())
            assert "canary GUID" in task["canary"] and task["examples"], t
            assert load_task(R.VENDORED_ROOT / vset, t).examples  # the project's loader reads it
    assert "Apache License" in (R.VENDORED_ROOT / "LICENSE-bigbench-Apache-2.0.txt").read_text()
    readme = (R.VENDORED_ROOT / "README.md").read_text()
    assert "bigbench==1.0.0" in readme and "benchmark_tasks/<task>/task.json" in readme and "package data" in readme.lower()


@pytest.mark.parametrize("rel", ["bigbench/navigate.json", "bigbench-skill/ruin_names.json", "LICENSE-bigbench-Apache-2.0.txt"])
def test_one_flipped_byte_in_a_copied_tree_fails_the_verifier(tmp_path: Path, rel: str) -> None:
    tree = tmp_path / "vendored"
    shutil.copytree(R.VENDORED_ROOT, tree)
    verify_manifest(tree)  # the copy verifies
    flip_byte(tree / rel, offset=len((tree / rel).read_bytes()) // 2)
    with pytest.raises(SecurityError, match=rel):
        verify_manifest(tree)
    with pytest.raises(SecurityError, match=rel):
        verify_manifest(tree, only=[rel])


def test_verifier_refuses_missing_unlisted_and_malformed(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "x.json").write_text("{}")
    write_manifest(tree)
    verify_manifest(tree)
    assert (tree / MANIFEST_NAME).read_text() == f"{file_sha256(tree / 'a' / 'x.json')}  a/x.json\n"
    (tree / "a" / "y.json").write_text("{}")
    with pytest.raises(SecurityError, match="a/y.json is not listed"):
        verify_manifest(tree)
    (tree / "a" / "y.json").unlink()
    (tree / "a" / "x.json").unlink()
    with pytest.raises(SecurityError, match="a/x.json is listed .* but missing"):
        verify_manifest(tree)
    (tree / MANIFEST_NAME).write_text("nothex  ../../etc/passwd\n")
    with pytest.raises(SecurityError, match="line 1"):
        verify_manifest(tree)


def test_resolver_reads_a_modified_vendored_file_never(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network) -> None:
    tree = tmp_path / "vendored"
    shutil.copytree(R.VENDORED_ROOT, tree)
    flip_byte(tree / "bigbench" / "winowhy.json", offset=100)
    monkeypatch.setattr(R, "VENDORED_ROOT", tree)
    assert R.resolve_task_dir(["navigate"]) == tree / "bigbench"  # untouched files still resolve
    with pytest.raises(SecurityError, match="bigbench/winowhy.json"):
        R.resolve_task_dir(["navigate", "winowhy"])
    with pytest.raises(SecurityError, match="bigbench/winowhy.json"):
        R.resolve_task_dir(None, "vendored:bigbench")


def test_order_vendored_sets_without_network_or_cache_writes(tmp_path: Path, no_network) -> None:
    cache = tmp_path / "cache"
    assert R.resolve_task_dir(list(DEV[:3]), cache=cache) == R.VENDORED_ROOT / "bigbench"
    assert R.resolve_task_dir(["implicatures"], cache=cache) == R.VENDORED_ROOT / "bigbench-skill"
    assert R.resolve_task_dir(None, cache=cache) == R.VENDORED_ROOT / "bigbench"  # default: the dev tasks
    assert not cache.exists() and no_network == []


def test_tasks_from_both_vendored_sets_meet_in_the_cache_without_a_download(tmp_path: Path, no_network) -> None:
    out = R.resolve_task_dir(["navigate", "implicatures"], cache=tmp_path)
    assert out == tmp_path / "bigbench" and sorted(p.name for p in out.iterdir()) == ["implicatures.json", "navigate.json"]
    assert (out / "navigate.json").read_bytes() == (R.VENDORED_ROOT / "bigbench" / "navigate.json").read_bytes()
    assert no_network == []


def test_task_extracted_earlier_is_reused_from_the_cache(tmp_path: Path, no_network) -> None:
    (tmp_path / "bigbench").mkdir()
    shutil.copy(MINI / "navigate.json", tmp_path / "bigbench" / "date_understanding.json")
    assert R.resolve_task_dir(["date_understanding", "winowhy"], cache=tmp_path) == tmp_path / "bigbench"
    assert no_network == []


def test_task_not_vendored_tries_the_pinned_sdist_then_fails_in_one_line(tmp_path: Path, no_network) -> None:
    with pytest.raises(ConfigError) as exc:
        R.resolve_task_dir(["date_understanding"], cache=tmp_path, field="--calib-dir")
    msg = str(exc.value)
    assert "\n" not in msg and "'date_understanding'" in msg
    assert "vendored:bigbench" in msg and "cache" in msg and "bigbench-1.0.0 sdist could not be fetched" in msg
    assert "fix: put date_understanding.json in a folder and pass --calib-dir" in msg
    assert no_network  # the sdist (and only then) was tried
    no_network.clear()
    with pytest.raises(ConfigError, match="downloading is off"):
        R.resolve_task_dir(["date_understanding"], cache=tmp_path, download=False)
    assert no_network == []


def test_explicit_folder_is_the_only_source(tmp_path: Path, no_network) -> None:
    assert R.resolve_task_dir(["navigate", "winowhy"], MINI) == MINI
    assert R.resolve_task_dir(None, "vendored:bigbench-skill") == R.VENDORED_ROOT / "bigbench-skill"
    # navigate is vendored, but an explicit folder is never completed from elsewhere
    with pytest.raises(ConfigError, match=r"--data-dir: task 'navigate' is not in .*fix: add the file there"):
        R.resolve_task_dir(["navigate"], "vendored:bigbench-skill")
    with pytest.raises(ConfigError, match="data.dir: folder .* does not exist"):
        R.resolve_task_dir(["navigate"], tmp_path / "nope", field="data.dir")
    with pytest.raises(ConfigError, match="vendored:nope is not a vendored task set .*vendored:bigbench-skill"):
        R.resolve_task_dir(["navigate"], "vendored:nope")
    assert no_network == []


def test_server_side_tasks_are_the_other_vendored_set_and_never_a_client_task(tmp_path: Path) -> None:
    folder, names = R.server_task_dir(DEV)
    assert folder == R.VENDORED_ROOT / "bigbench-skill" and tuple(names) == SKILL
    folder, names = R.server_task_dir(["implicatures", "ruin_names"])
    assert folder == R.VENDORED_ROOT / "bigbench" and tuple(names) == DEV
    with pytest.raises(ConfigError, match="--server-tasks: navigate is also a client task.*vendored:bigbench-skill"):
        R.server_task_dir(["navigate", "winowhy"], ["navigate"], MINI, field="--server-dir", tasks_field="--server-tasks")
    with pytest.raises(ConfigError, match="--calib-dir: .*also client tasks"):
        R.server_task_dir(["navigate", "winowhy"], None, MINI)  # every task of the folder, two are client tasks
    with pytest.raises(ConfigError, match="both vendored sets"):
        R.server_task_dir(["navigate", "implicatures"])


def test_run_config_accepts_vendored_sets_and_names_the_field_otherwise(tmp_path: Path) -> None:
    from fedproxy_secure.config import parse_run_config

    base = {"name": "x", "model": {"tiny": {}}}
    cfg = parse_run_config({**base, "data": {"dir": "vendored:bigbench", "tasks": ["navigate"],
                                             "calib_dir": "vendored:bigbench-skill", "calib_tasks": ["ruin_names"]}}, tmp_path)
    assert cfg.data.dir == R.VENDORED_ROOT / "bigbench" and cfg.data.calib_dir == R.VENDORED_ROOT / "bigbench-skill"
    with pytest.raises(ConfigError, match=r"data.calib_dir = 'vendored:skill'.*fix: use one of vendored:bigbench"):
        parse_run_config({**base, "data": {"dir": "vendored:bigbench", "calib_dir": "vendored:skill"}}, tmp_path)
    with pytest.raises(ConfigError, match=r"data.calib_tasks: navigate also in data.tasks.*fix"):
        parse_run_config({**base, "data": {"dir": "vendored:bigbench", "tasks": ["navigate", "winowhy"],
                                           "calib_tasks": ["navigate"]}}, tmp_path)
    with pytest.raises(ConfigError, match=r"data.dir: folder .* does not exist.*vendored:bigbench"):
        parse_run_config({**base, "data": {"dir": "nowhere"}}, tmp_path)


def test_data_fetch_of_a_task_not_vendored_without_network_is_one_line_exit_2(tmp_path: Path, monkeypatch, no_network) -> None:
    from typer.testing import CliRunner

    from fedproxy_secure.cli.main import _load_commands, app

    _load_commands()
    monkeypatch.setenv("FEDPROXY_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(app, ["data", "fetch", "bigbench", "--tasks", "date_understanding"])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "date_understanding" in lines[0] and "--data-dir" in lines[0] and "Traceback" not in r.output
    assert isinstance(r.exception, SystemExit) and no_network
    no_network.clear()
    r = CliRunner().invoke(app, ["data", "fetch", "bigbench", "--tasks", "navigate,winowhy"])
    assert r.exit_code == 0 and r.output.strip() == str(R.VENDORED_ROOT / "bigbench") and no_network == []


def test_data_fetch_subprocess_without_network_prints_no_traceback(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "FEDPROXY_CACHE": str(tmp_path / "cache"), "FEDPROXY_PYPI_INDEX": "http://127.0.0.1:9/simple",
           "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    r = subprocess.run([sys.executable, "-m", "fedproxy_secure.cli.main", "data", "fetch", "bigbench", "--tasks", "snarks"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr and "'snarks'" in r.stderr


def test_wheel_carries_the_vendored_tree_and_its_manifest(tmp_path: Path) -> None:
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("fedproxy_secure-*.whl")
    prefix = "fedproxy_secure/data/vendored/"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path / "x", [n for n in zf.namelist() if n.startswith(prefix)])
    verify_manifest(tmp_path / "x" / prefix)  # every listed file is in the wheel, unchanged, nothing extra
    assert len(read_manifest(tmp_path / "x" / prefix)) == 18
