"""Progress bars and log set-up for long runs (simulate, demo): rich progress with an ETA on stderr,
library noise (transformers/opacus warnings, HF tqdm bars) sent to the run's log file.

Rules: bars are drawn only when stderr is a terminal and the run is not ``--quiet``; otherwise every
call is a no-op, so library code can report progress unconditionally. Numbers for people go
through :func:`fmt_loss` / :func:`fmt_pct`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console

Advance = Callable[[int], None]


def fmt_loss(x: float | None) -> str:
    """A loss for people: 4 decimals, '-' for None."""
    return "-" if x is None else f"{x:.4f}"


def fmt_pct(x: float | None, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage with ``digits`` decimals, '-' for None."""
    return "-" if x is None else f"{100.0 * x:.{digits}f}"


def make_console(*, stderr: bool = False, quiet: bool = False) -> Console:
    """A rich console whose log lines are not wrapped at 80 columns when output is not a terminal.

    Guarantees: soft wrap (a long line stays one line in a file or pipe); ``quiet`` silences it.
    """
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, quiet=quiet, soft_wrap=True, width=width)


def bars_enabled(quiet: bool = False) -> bool:
    """Whether progress bars are drawn: stderr is a terminal and not ``quiet``."""
    return (not quiet) and sys.stderr.isatty()


class RunProgress:
    """Rich progress bars (description, bar, n/total, elapsed, ETA) on stderr, or nothing.

    Use :meth:`task` as a context manager yielding an ``advance(n)`` callable; it is a no-op
    when bars are disabled.
    """

    def __init__(self, *, enabled: bool | None = None, quiet: bool = False) -> None:
        self.enabled = bars_enabled(quiet) if enabled is None else enabled
        self._progress = None
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                      console=Console(stderr=True), transient=True)

    def __enter__(self) -> "RunProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        """A bar for one piece of work of ``total`` steps; yields ``advance(n=1)``."""
        if self._progress is None:
            yield lambda n=1: None
            return
        tid = self._progress.add_task(description, total=total)
        try:
            yield lambda n=1: self._progress.advance(tid, n)
        finally:
            self._progress.remove_task(tid)


def capture_library_output(log_file: str | os.PathLike) -> logging.Handler:
    """Send Python warnings (opacus, torch), transformers' logger and HF hub bars to ``log_file``.

    Guarantees: after the call ``warnings.warn`` writes to ``log_file`` instead of stderr;
    transformers logs go only to ``log_file`` (its console handler removed); HF tqdm bars are
    disabled (``HF_HUB_DISABLE_PROGRESS_BARS=1`` and transformers' own switch). Returns the file
    handler (call :func:`release_library_output` with it to undo the logging part).
    """
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.captureWarnings(True)
    wlog = logging.getLogger("py.warnings")
    wlog.addHandler(handler)
    wlog.propagate = False
    try:
        import transformers

        transformers.logging.disable_default_handler()
        transformers.logging.disable_progress_bar()
        transformers.logging.get_logger().addHandler(handler)
    except ImportError:  # pragma: no cover - transformers is a runtime dependency
        pass
    warnings.simplefilter("default")
    return handler


def release_library_output(handler: logging.Handler) -> None:
    """Undo :func:`capture_library_output`'s logging changes (for tests and long-lived processes)."""
    logging.captureWarnings(False)
    wlog = logging.getLogger("py.warnings")
    wlog.removeHandler(handler)
    wlog.propagate = True
    try:
        import transformers

        transformers.logging.get_logger().removeHandler(handler)
        transformers.logging.enable_default_handler()
    except ImportError:  # pragma: no cover
        pass
    handler.close()
