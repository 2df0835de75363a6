"""The bundle manifest: what a signature covers, and strict rules for paths and file types.

MANIFEST.json is canonical JSON (see :mod:`.canonical`)::

    {"format": "fedproxy-secure/manifest/v1", "bundle_id": HEX32, "version": INT,
     "issued_at": TS, "not_before": TS, "not_after": TS, "key_id": HEX64,
     "base_model_hash": STR, "files": [{"path": P, "size": INT, "sha256": HEX64}, ...]}

with ``files`` sorted by path. MANIFEST.sig is the raw 64-byte Ed25519 signature over
``MANIFEST_DOMAIN + MANIFEST.json bytes``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fedproxy_secure.errors import SecurityError

from .canonical import canonical_dumps, canonical_loads
from .timeutil import format_time, parse_time

MANIFEST_FORMAT = "fedproxy-secure/manifest/v1"
MANIFEST_NAME = "MANIFEST.json"
SIGNATURE_NAME = "MANIFEST.sig"
RESERVED = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
MAX_MANIFEST_BYTES = 1 << 20
MAX_FILES = 4096
MAX_PATH_LEN = 255
MAX_DEPTH = 8
MAX_FILE_SIZE = 1 << 40
ALLOWED_SUFFIXES = frozenset({".json", ".safetensors", ".txt", ".model", ".md", ".jinja"})
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})
REQUIRED_FILES = ("config.json", "fedproxy.json")

_COMPONENT = re.compile(r"^[A-Za-z0-9_.-]+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")

__all__ = [
    "FileEntry",
    "Manifest",
    "check_path",
    "check_file_type",
    "parse_manifest",
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
]


def check_path(path: object) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a bundle; SecurityError naming the problem."""
    if not isinstance(path, str) or not path:
        raise SecurityError(f"manifest path {path!r} must be a non-empty string")
    if "\\" in path:
        raise SecurityError(f"path {path!r} contains a backslash (refused)")
    if path.startswith("/"):
        raise SecurityError(f"path {path!r} is absolute (refused)")
    if len(path) > MAX_PATH_LEN:
        raise SecurityError(f"path {path[:40]!r}... is longer than {MAX_PATH_LEN} characters")
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        raise SecurityError(f"path {path!r} is nested deeper than {MAX_DEPTH} levels")
    for part in parts:
        if part in ("", ".", ".."):
            raise SecurityError(f"path {path!r} contains an empty, '.' or '..' component (refused)")
        if not _COMPONENT.match(part):
            raise SecurityError(f"path {path!r} has characters outside [A-Za-z0-9_.-] (refused)")
    return path


def check_file_type(path: str) -> None:
    """SecurityError unless ``path`` has an allowed suffix; pickle-capable weight formats are named as such."""
    name = path.rsplit("/", 1)[-1].lower()
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if suffix in PICKLE_SUFFIXES:
        raise SecurityError(
            f"forbidden file type {path!r}: pickle-capable weights ({suffix}) are refused; only .safetensors weights are allowed"
        )
    if suffix not in ALLOWED_SUFFIXES:
        raise SecurityError(f"file type of {path!r} is not allowed (allowed: {', '.join(sorted(ALLOWED_SUFFIXES))})")


@dataclass(frozen=True)
class FileEntry:
    """One bundle file as the manifest records it."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A structurally valid manifest (the signature is checked separately, over its exact bytes)."""

    bundle_id: str
    version: int
    issued_at: datetime
    not_before: datetime
    not_after: datetime
    key_id: str
    base_model_hash: str
    files: tuple[FileEntry, ...]

    def to_json(self) -> dict[str, Any]:
        """The manifest document (files sorted by path)."""
        return {
            "format": MANIFEST_FORMAT,
            "bundle_id": self.bundle_id,
            "version": self.version,
            "issued_at": format_time(self.issued_at),
            "not_before": format_time(self.not_before),
            "not_after": format_time(self.not_after),
            "key_id": self.key_id,
            "base_model_hash": self.base_model_hash,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in sorted(self.files, key=lambda f: f.path)],
        }

    def to_bytes(self) -> bytes:
        """The canonical bytes that get signed."""
        return canonical_dumps(self.to_json())

    def by_path(self) -> dict[str, FileEntry]:
        """Files keyed by path."""
        return {f.path: f for f in self.files}


def _int(v: Any, field: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise SecurityError(f"manifest {field} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def validate_manifest(m: Manifest) -> None:
    """Structural rules shared by issuing and verifying: paths, types, required files, limits."""
    if not 1 <= len(m.files) <= MAX_FILES:
        raise SecurityError(f"manifest must list 1..{MAX_FILES} files, lists {len(m.files)}")
    seen: set[str] = set()
    for f in m.files:
        check_path(f.path)
        if f.path in RESERVED:
            raise SecurityError(f"manifest lists reserved file {f.path!r}")
        check_file_type(f.path)
        low = f.path.lower()
        if low in seen:
            raise SecurityError(f"manifest lists {f.path!r} twice (paths are compared case-insensitively)")
        seen.add(low)
    for req in REQUIRED_FILES:
        if req not in seen:
            raise SecurityError(f"manifest does not list required file {req}")
    if not any(f.path.endswith(".safetensors") for f in m.files):
        raise SecurityError("manifest lists no .safetensors weights")
    if m.not_after <= m.not_before:
        raise SecurityError("manifest not_after is not after not_before")


def parse_manifest(data: bytes) -> Manifest:
    """Parse canonical MANIFEST.json bytes into a validated :class:`Manifest`; SecurityError on any deviation."""
    doc = canonical_loads(data, what=MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES)
    keys = {"format", "bundle_id", "version", "issued_at", "not_before", "not_after", "key_id", "base_model_hash", "files"}
    if not isinstance(doc, dict) or set(doc) != keys:
        raise SecurityError(f"{MANIFEST_NAME} must have exactly the fields {sorted(keys)}")
    if doc["format"] != MANIFEST_FORMAT:
        raise SecurityError(f"unknown manifest format {doc['format']!r} (expected {MANIFEST_FORMAT})")
    if not isinstance(doc["bundle_id"], str) or not _HEX32.match(doc["bundle_id"]):
        raise SecurityError("manifest bundle_id must be 32 lowercase hex characters")
    if not isinstance(doc["key_id"], str) or not _HEX64.match(doc["key_id"]):
        raise SecurityError("manifest key_id must be 64 lowercase hex characters")
    bmh = doc["base_model_hash"]
    if not isinstance(bmh, str) or not 1 <= len(bmh) <= 256:
        raise SecurityError("manifest base_model_hash must be a non-empty string")
    if not isinstance(doc["files"], list):
        raise SecurityError("manifest files must be a list")
    files = []
    for i, f in enumerate(doc["files"]):
        if not isinstance(f, dict) or set(f) != {"path", "size", "sha256"}:
            raise SecurityError(f"manifest files[{i}] must have exactly path, size, sha256")
        if not isinstance(f["sha256"], str) or not _HEX64.match(f["sha256"]):
            raise SecurityError(f"manifest files[{i}].sha256 must be 64 lowercase hex characters")
        files.append(FileEntry(check_path(f["path"]), _int(f["size"], f"files[{i}].size", 0, MAX_FILE_SIZE), f["sha256"]))
    m = Manifest(
        bundle_id=doc["bundle_id"],
        version=_int(doc["version"], "version", 0, 2**53),
        issued_at=parse_time(doc["issued_at"], "manifest issued_at"),
        not_before=parse_time(doc["not_before"], "manifest not_before"),
        not_after=parse_time(doc["not_after"], "manifest not_after"),
        key_id=doc["key_id"],
        base_model_hash=bmh,
        files=tuple(files),
    )
    if [f.path for f in files] != sorted(f.path for f in files):
        raise SecurityError("manifest files must be sorted by path")
    validate_manifest(m)
    return m
