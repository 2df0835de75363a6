"""Where BIG-bench task data comes from: the one resolution order every command uses.

:func:`resolve_task_dir` returns the folder holding ``<task>.json`` for a group of tasks. Guarantee:

1. **an explicit folder** (``--data-dir`` / ``--calib-dir`` / ``--server-dir``, config ``data.dir`` /
   ``data.calib_dir``; ``vendored:<set>`` names a vendored folder) is the only source when given:
   nothing else is tried, and a task missing there is an error. A run's data is what the user named,
   never silently completed from elsewhere;
2. otherwise **the vendored copy** (package data, :data:`VENDORED_ROOT`) when one vendored set holds
   every task of the group; no network, no cache write;
3. otherwise **the cache folder** ``$FEDPROXY_CACHE/bigbench``: vendored tasks are copied there, tasks
   already extracted are reused, and only the tasks the package does not carry are taken from the
   pinned ``bigbench==1.0.0`` sdist (:func:`fedproxy_secure.data.fetch.fetch_bigbench`, hash-pinned).

A vendored task file is checked against the vendored ``SHA256SUMS`` before it is handed out
(SecurityError if it was modified). When nothing provides a task, the ConfigError (exit code 2 in
the CLI) is one line naming the task, what was tried and the fix (an explicit folder).

Server-side text (calibration, distillation) is chosen by :func:`server_task_dir`: by default the
vendored set no client task is in (the skill tasks for a dev-task federation, and the reverse), and
never a client task.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Sequence

from fedproxy_secure.errors import ConfigError, DataError

#: the vendored tasks' root (package data): one folder per set, the license, README and SHA256SUMS
VENDORED_ROOT = Path(__file__).resolve().parent / "vendored"
#: the vendored sets, in the order the resolver tries them
VENDORED_SETS = ("bigbench", "bigbench-skill")
#: the default client/evaluation set (the 8 dev tasks)
DEFAULT_SET = "bigbench"
#: a config or option value naming a vendored set: ``vendored:bigbench``
VENDORED_SCHEME = "vendored:"


def vendored_dir(name: str, field: str = "data.dir") -> Path:
    """The folder of the vendored set ``name``; ConfigError naming ``field`` and the sets if unknown."""
    if name not in VENDORED_SETS:
        raise ConfigError(f"{field}: {VENDORED_SCHEME}{name} is not a vendored task set "
                          f"(fix: use one of {', '.join(VENDORED_SCHEME + s for s in VENDORED_SETS)})")
    return VENDORED_ROOT / name


def vendored_tasks(name: str) -> tuple[str, ...]:
    """Task names of the vendored set ``name`` (sorted file stems)."""
    return tuple(sorted(p.stem for p in vendored_dir(name).glob("*.json")))


def vendored_set_of(folder: Path) -> str | None:
    """The vendored set whose folder ``folder`` is, else None."""
    folder = Path(folder).resolve()
    return next((s for s in VENDORED_SETS if folder == (VENDORED_ROOT / s).resolve()), None)


def data_dir_value(value: str | Path, field: str = "data.dir", base: Path | None = None) -> Path:
    """A folder option/config value as a path: ``vendored:<set>`` is that vendored folder; any other
    value is a path (``~`` expanded; relative to ``base`` when given). ConfigError names ``field``."""
    text = str(value)
    if text.startswith(VENDORED_SCHEME):
        return vendored_dir(text[len(VENDORED_SCHEME):], field)
    p = Path(text).expanduser()
    return p if p.is_absolute() or base is None else base / p


def _has(folder: Path, task: str) -> bool:
    return (folder / f"{task}.json").is_file() or (folder / task / "task.json").is_file()


def _verified(name: str, tasks: Sequence[str]) -> Path:
    from fedproxy_secure.data.manifest import verify_manifest

    verify_manifest(VENDORED_ROOT, only=[f"{name}/{t}.json" for t in tasks])
    return VENDORED_ROOT / name


def resolve_task_dir(tasks: Sequence[str] | None, data_dir: str | Path | None = None, *,
                     field: str = "--data-dir", cache: Path | None = None, download: bool = True,
                     progress: Callable[[int, int], None] | None = None,
                     log: Callable[[str], None] | None = None) -> Path:
    """The folder holding every task of ``tasks``, by the order in the module docstring.

    ``tasks=None`` means every task of the explicit folder (or of the default vendored set when
    none is given). ``download=False`` stops before the network. Guarantees: the returned folder
    holds ``<task>.json`` (or ``<task>/task.json``) for each task; vendored files match the
    manifest; a failure is one-line ConfigError naming the task, the sources tried and the fix
    (``field``), or SecurityError for a modified vendored file or a hash-mismatched download.
    """
    if data_dir is not None:
        folder = data_dir_value(data_dir, field)
        if not folder.is_dir():
            raise ConfigError(f"{field}: folder {str(folder)!r} does not exist (fix: point it at a folder of "
                              f"<task>.json files, or leave it out to use the vendored BIG-bench tasks)")
        names = list(tasks) if tasks is not None else sorted(p.stem for p in folder.glob("*.json"))
        missing = [t for t in names if not _has(folder, t)]
        if missing:
            raise ConfigError(f"{field}: task {missing[0]!r} is not in {str(folder)!r} (expected {missing[0]}.json; "
                              f"an explicit folder is the only source tried) (fix: add the file there, or leave "
                              f"{field} out to use the vendored tasks, then the pinned bigbench sdist)")
        vset = vendored_set_of(folder)
        return _verified(vset, names) if vset else folder
    if tasks is None:
        return _verified(DEFAULT_SET, vendored_tasks(DEFAULT_SET))
    names = list(dict.fromkeys(tasks))
    if not names:
        raise ConfigError(f"{field}: no task names given (fix: name at least one task)")
    for vset in VENDORED_SETS:
        if set(names) <= set(vendored_tasks(vset)):
            return _verified(vset, names)
    return _cache_dir(names, field, cache, download, progress, log)


def _cache_dir(names: list[str], field: str, cache: Path | None, download: bool,
               progress: Callable[[int, int], None] | None, log: Callable[[str], None] | None) -> Path:
    """Step 3: the cache folder, vendored tasks copied in, the rest from the pinned sdist."""
    from fedproxy_secure.data.fetch import default_cache, fetch_bigbench

    cache = Path(cache) if cache else default_cache()
    out = cache / "bigbench"
    for t in names:
        vset = next((s for s in VENDORED_SETS if t in vendored_tasks(s)), None)
        if vset and not (out / f"{t}.json").is_file():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_verified(vset, [t]) / f"{t}.json", out / f"{t}.json")
    missing = [t for t in names if not (out / f"{t}.json").is_file()]
    if not missing:
        return out
    tried = (f"not in the vendored tasks ({', '.join(VENDORED_SCHEME + s for s in VENDORED_SETS)}) "
             f"nor in the cache {str(out)!r}")
    fix = f"(fix: put {missing[0]}.json in a folder and pass {field} FOLDER)"
    if not download:
        raise ConfigError(f"task {missing[0]!r}: {tried}; downloading is off {fix}")
    if log:
        log(f"tasks not vendored ({', '.join(missing)}): fetching the pinned bigbench-1.0.0 sdist into {cache}")
    try:
        import httpx

        return fetch_bigbench(names, cache, progress=progress)
    except (DataError, httpx.HTTPError, OSError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"task {missing[0]!r}: {tried}, and the pinned bigbench-1.0.0 sdist could not be "
                          f"fetched ({reason}) {fix}") from None


def check_disjoint(client_tasks: Sequence[str], server_tasks: Sequence[str], field: str) -> None:
    """ConfigError naming ``field`` if a server-side task (calibration/distillation) is a client task."""
    overlap = sorted(set(client_tasks) & set(server_tasks))
    if overlap:
        verb = "is also a client task" if len(overlap) == 1 else "are also client tasks"
        others = [s for s in reversed(VENDORED_SETS) if not set(client_tasks) & set(vendored_tasks(s))]
        hint = f", e.g. those of {VENDORED_SCHEME}{others[0]}" if others else ""
        raise ConfigError(f"{field}: {', '.join(overlap)} {verb}; server-side text must be data no client "
                          f"holds (fix: choose other tasks{hint})")


def default_server_set(client_tasks: Sequence[str]) -> str:
    """The vendored set that shares no task with ``client_tasks`` (the skill set for the dev tasks, and
    the reverse); ConfigError if the client tasks touch both sets."""
    for vset in reversed(VENDORED_SETS):  # the skill set first: client tasks are usually the dev set
        if not set(client_tasks) & set(vendored_tasks(vset)):
            return vset
    raise ConfigError("client tasks come from both vendored sets, so no vendored set is server-only "
                      "(fix: pass the server-side task folder explicitly)")


def server_task_dir(client_tasks: Sequence[str], server_tasks: Sequence[str] | None = None,
                    server_dir: str | Path | None = None, *, field: str = "--calib-dir",
                    tasks_field: str | None = None, **resolve_kw) -> tuple[Path, list[str]]:
    """``(folder, task names)`` of server-side text no client holds, for calibration and distillation.

    Default (no tasks, no folder): every task of :func:`default_server_set`. A folder without tasks:
    every task in it. Tasks without a folder: the resolution order. Guarantees: no returned task is a
    client task (ConfigError naming ``tasks_field`` or ``field`` otherwise); the folder holds each task.
    """
    if server_tasks is None and server_dir is None:
        vset = default_server_set(client_tasks)
        names = list(vendored_tasks(vset))
        return resolve_task_dir(names, field=field, **resolve_kw), names
    folder = resolve_task_dir(server_tasks, server_dir, field=field, **resolve_kw)
    names = list(server_tasks) if server_tasks is not None else sorted(p.stem for p in folder.glob("*.json"))
    check_disjoint(client_tasks, names, tasks_field or field)
    return folder, names
