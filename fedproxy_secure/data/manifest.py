"""SHA-256 manifest of a data folder (``SHA256SUMS``, the format ``sha256sum -c`` reads).

The vendored BIG-bench tasks ship with one (``fedproxy_secure/data/vendored/SHA256SUMS``): a test
checks the whole tree against it, and the resolver checks each task file it hands out, so a task
file changed by one byte is refused instead of silently scored.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from fedproxy_secure.errors import SecurityError

MANIFEST_NAME = "SHA256SUMS"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tree_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST_NAME and "__pycache__" not in p.parts)


def write_manifest(root: str | Path) -> Path:
    """Write ``root/SHA256SUMS`` listing every file under ``root`` (sorted, POSIX paths); returns its path.

    Guarantees: the result verifies with :func:`verify_manifest` until a listed file changes, and
    with ``sha256sum -c SHA256SUMS`` run inside ``root``.
    """
    root = Path(root)
    lines = [f"{file_sha256(root / rel)}  {rel}\n" for rel in _tree_files(root)]
    out = root / MANIFEST_NAME
    out.write_text("".join(lines), encoding="utf-8")
    return out


def read_manifest(root: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` from ``root/SHA256SUMS``; SecurityError if it is missing or malformed."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise SecurityError(f"{path}: manifest missing; the data folder cannot be checked (reinstall fedproxy-secure)")
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel or rel.startswith("/") or ".." in Path(rel).parts:
            raise SecurityError(f"{path}: line {n} is not '<sha256>  <relative path>'")
        out[rel] = digest
    return out


def verify_manifest(root: str | Path, only: Iterable[str] | None = None) -> None:
    """Check files under ``root`` against ``root/SHA256SUMS``.

    Guarantees: returns only if every checked file's SHA-256 equals its manifest line. With ``only``
    (relative paths) just those files are checked, each of which must be listed; without it the
    whole tree is checked and a listed file that is missing, or a file that is not listed, is an
    error too. Every failure is a SecurityError naming the file.
    """
    root = Path(root)
    listed = read_manifest(root)
    if only is None:
        present = set(_tree_files(root))
        extra = sorted(present - set(listed))
        if extra:
            raise SecurityError(f"{root}: {extra[0]} is not listed in {MANIFEST_NAME} (not part of the vendored data)")
        names = sorted(listed)
    else:
        names = list(only)
    for rel in names:
        if rel not in listed:
            raise SecurityError(f"{root}: {rel} is not listed in {MANIFEST_NAME}")
        path = root / rel
        if not path.is_file():
            raise SecurityError(f"{root}: {rel} is listed in {MANIFEST_NAME} but missing (reinstall fedproxy-secure)")
        got = file_sha256(path)
        if got != listed[rel]:
            raise SecurityError(f"{root}: {rel} has SHA-256 {got[:16]}..., not the {listed[rel][:16]}... in "
                                f"{MANIFEST_NAME}: the file was modified (reinstall fedproxy-secure or restore it)")
