"""`bench quality` and `bench fusion` defaults: the vendored dev tasks for the clients, the vendored set no
client holds for server-side text, no download (sockets blocked); an overlap is one line, exit 2.
The benchmarks themselves are replaced by recorders: only the CLI's data resolution runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedproxy_secure.cli.main import _load_commands, app
from fedproxy_secure.data import resolve as R
from tests.test_data_vendored import DEV, SKILL, no_network  # noqa: F401 - the fixture

_load_commands()


def test_bench_quality_defaults_resolve_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network) -> None:  # noqa: F811
    from fedproxy_benchmarks import quality

    seen = []

    def record(args):
        seen.append(args)
        (Path(args.out) / "results.md").parent.mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.md").write_text("ok\n")

    monkeypatch.setattr(quality, "run_quality", record)
    r = CliRunner().invoke(app, ["bench", "quality", "--llm", str(tmp_path), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    (a,) = seen
    assert a.data_dir == R.VENDORED_ROOT / "bigbench" and a.calib_dir == R.VENDORED_ROOT / "bigbench-skill"
    assert tuple(a.calib_tasks) == SKILL and no_network == []
    r = CliRunner().invoke(app, ["bench", "quality", "--llm", str(tmp_path), "--out", str(tmp_path / "o2"),
                                 "--calib-dir", "vendored:bigbench"])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "--calib-dir" in lines[0] and "client task" in lines[0], r.output


def test_bench_fusion_defaults_resolve_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network) -> None:  # noqa: F811
    from fedproxy_benchmarks import fusion_study

    seen = []
    monkeypatch.setattr(fusion_study, "run_fusion_study", lambda cfg, log: seen.append(cfg) or {})
    monkeypatch.setattr(fusion_study, "print_table", lambda summary: None)
    r = CliRunner().invoke(app, ["bench", "fusion", "--llm", str(tmp_path), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    (cfg,) = seen
    assert Path(cfg.data_dir) == R.VENDORED_ROOT / "bigbench" and Path(cfg.server_dir) == R.VENDORED_ROOT / "bigbench-skill"
    assert cfg.server_tasks == SKILL and no_network == []
    r = CliRunner().invoke(app, ["bench", "fusion", "--llm", str(tmp_path), "--out", str(tmp_path / "o2"),
                                 "--server-tasks", "navigate"])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "--server-tasks: navigate is also a client task" in lines[0], r.output


def test_fusion_study_server_texts_refuse_an_evaluation_task(tmp_path: Path) -> None:
    from fedproxy_benchmarks.fusion_study import StudyConfig, server_texts
    from fedproxy_secure.errors import ConfigError

    cfg = StudyConfig(llm="-", data_dir="-", out="-")  # defaults: vendored:bigbench-skill, every task there
    texts = server_texts(cfg, 12, 0, set(DEV))
    assert len(texts) == 12 and all(isinstance(t, str) and t for t in texts)
    with pytest.raises(ConfigError, match="--server-dir: implicatures is also a client task"):
        server_texts(cfg, 12, 0, {"implicatures"})
