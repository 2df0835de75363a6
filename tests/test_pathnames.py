"""Results files never record this machine's home or working directory."""

from __future__ import annotations

from pathlib import Path

from fedproxy_secure.pathnames import portable_path


def test_portable_path_forms(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home" / "alice"
    work = tmp_path / "work"
    (home / ".cache" / "m").mkdir(parents=True)
    (work / "runs").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert portable_path(home / ".cache" / "m") == "~/.cache/m"
    assert portable_path(work / "runs" / "x") == "runs/x"
    assert portable_path("../shared/data") == "../shared/data"
    other = tmp_path / "elsewhere"
    assert portable_path(other) == str(other)
    assert str(home) not in portable_path(home / "a" / "b")
