"""How results files name paths: never the absolute path of the machine that wrote them."""

from __future__ import annotations

from pathlib import Path


def portable_path(p: str | Path) -> str:
    """``p`` as a results file should record it: relative paths unchanged, paths under the working
    directory relative to it, paths under the home directory as ``~/...``, anything else as given.

    Guarantees: the result never contains the home directory's absolute path.
    """
    raw = Path(p)
    if not raw.is_absolute():
        return str(raw)
    q = raw.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if q.is_relative_to(cwd) and cwd != Path("/"):
        return str(q.relative_to(cwd)) or "."
    if q.is_relative_to(home):
        return "~/" + str(q.relative_to(home))
    return str(raw)
