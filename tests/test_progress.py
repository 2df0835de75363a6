"""progress.py (bars only on a TTY, library output into the run's log file, unwrapped console, rounded
numbers) and the shared plot helpers of report.py."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from fedproxy_secure.progress import (RunProgress, bars_enabled, capture_library_output, fmt_loss, fmt_pct, make_console,
                                      release_library_output)
from fedproxy_secure.report import accuracy_bars, plot_accuracy, plot_rounds, y_range


def test_numbers_are_rounded_for_people() -> None:
    assert fmt_loss(5.377774477005005) == "5.3778"
    assert fmt_loss(None) == "-"
    assert fmt_pct(0.4333333) == "43.3"


def test_bars_are_off_without_a_terminal_or_with_quiet() -> None:
    assert bars_enabled(quiet=True) is False
    p = RunProgress()  # pytest captures stderr: not a terminal
    assert p.enabled is False
    with p, p.task("work", 3) as advance:
        advance(1)  # a no-op, not an error


def test_bars_run_when_enabled() -> None:
    with RunProgress(enabled=True) as p, p.task("work", 2) as advance:
        advance(1)
        advance(1)
        (task,) = p._progress.tasks
        assert task.completed == 2 and task.total == 2


def test_library_warnings_go_to_the_log_file_not_the_console(tmp_path: Path, capsys) -> None:
    import transformers

    log = tmp_path / "run.log"
    h = capture_library_output(log)
    try:
        warnings.warn("opacus-like warning 123", UserWarning)
        transformers.logging.get_logger("transformers.modeling_utils").warning("transformers warning 456")
    finally:
        release_library_output(h)
    captured = capsys.readouterr()
    assert "123" not in captured.err and "456" not in captured.err
    text = log.read_text()
    assert "opacus-like warning 123" in text and "transformers warning 456" in text
    import os

    assert os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1"
    assert logging.getLogger("py.warnings").propagate is True  # released


def test_console_lines_are_not_wrapped_at_80_columns(capsys) -> None:
    line = "round 1/2: " + "x" * 150
    make_console().print(line)
    out = capsys.readouterr().out
    assert line in out.splitlines()


def test_y_range_shows_differences_not_from_zero() -> None:
    lo, hi = y_range([0.61, 0.66, 0.70])
    assert 0.5 < lo < 0.61 and 0.70 < hi < 0.8
    assert y_range([0.95, 1.0]) [1] == 1.0  # clipped to [0, 1]
    lo, hi = y_range([0.5, 0.5])
    assert hi - lo >= 0.1  # never a zero-height axis


def test_accuracy_bars_use_ci_as_error_bars_and_readable_names(tmp_path: Path) -> None:
    summary = {"labels": {"zs_llm": "LLM (zero-shot)", "fused": "fused LLM"},
               "methods": {"zs_llm": {"headline": 0.6, "headline_ci": [0.55, 0.64]},
                           "fused": {"headline": 0.7, "headline_ci": [0.66, 0.75]}}}
    bars = accuracy_bars(summary)
    assert [b["label"] for b in bars] == ["LLM (zero-shot)", "fused LLM"]
    assert bars[0]["err_low"] == pytest.approx(0.05) and bars[1]["err_high"] == pytest.approx(0.05)
    assert plot_accuracy(tmp_path / "a.png", summary).stat().st_size > 0


def test_plot_rounds_writes_loss_and_per_site_epsilon(tmp_path: Path) -> None:
    series = {"loss": {"mean": [(1, 5.3), (2, 5.1)]}, "epsilon": {"site0": [(1, 4.0), (2, 8.0)],
                                                                  "site1": [(1, 4.0), (2, 8.0)]},
              "epsilon_budget": 8.0}
    assert plot_rounds(tmp_path / "r.png", series).stat().st_size > 0


def test_plots_are_skipped_with_a_logged_line_without_matplotlib(tmp_path: Path, monkeypatch, caplog) -> None:
    """matplotlib is the [plots] extra: without it the plots are skipped (None, one warning each), no error."""
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    summary = {"methods": {"zs_llm": {"headline": 0.6}}}
    with caplog.at_level(logging.WARNING, logger="fedproxy_secure.report"):
        assert plot_accuracy(tmp_path / "a.png", summary) is None
        assert plot_rounds(tmp_path / "r.png", {"loss": {}, "epsilon": {}}) is None
    assert not list(tmp_path.iterdir())
    msgs = [r.getMessage() for r in caplog.records if r.name == "fedproxy_secure.report"]
    assert len(msgs) == 2 and all("matplotlib is not installed" in m and "[plots]" in m for m in msgs)
    assert "a.png" in msgs[0] and "r.png" in msgs[1]
