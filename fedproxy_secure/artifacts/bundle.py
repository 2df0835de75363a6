"""Issuing and verifying signed proxy bundles.

Verification order (nothing from a model file is parsed before step 6):

1. open the bundle folder (no symlink) and read MANIFEST.sig (exactly 64 bytes) and MANIFEST.json
   (at most 1 MiB) without following symlinks;
2. check the signature over ``MANIFEST_DOMAIN + manifest bytes`` against the pinned keyset's keys
   *before* parsing the manifest; then parse it (strict canonical JSON);
3. the signing key must be the manifest's ``key_id``, known, not revoked and inside its validity;
   the bundle must be inside ``not_before..not_after``;
4. anti-rollback: version >= the highest version already accepted (per keyset name and base model);
5. the folder tree must hold exactly the manifest's files: no symlinks, no special files, no extra
   or missing files, no forbidden (pickle-capable) types;
6. each file is opened beneath the bundle folder with O_NOFOLLOW on every component, streamed
   through SHA-256 (1 MiB chunks), optionally copied into a private folder *from the same bytes*,
   and compared to the manifest (size and digest, constant time); .safetensors headers are checked
   and fedproxy.json's base_model_hash must equal the manifest's;
7. only then is the new version recorded in the anti-rollback state.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import stat
import struct
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedproxy_secure.errors import ConfigError, SecurityError

from .canonical import canonical_loads
from .keys import MANIFEST_DOMAIN, key_id, sign, verify_signature
from .keyset import KeyEntry, Keyset, resolve_key
from .manifest import (
    MANIFEST_NAME,
    MAX_DEPTH,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    RESERVED,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    check_file_type,
    check_path,
    parse_manifest,
    validate_manifest,
)
from .rollback import check_rollback, record_accepted
from .timeutil import as_utc, format_time

CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0)

__all__ = ["VerifiedBundle", "issue_bundle", "verify_bundle", "list_tree", "hash_stream"]


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every check of :func:`verify_bundle`.

    ``root`` is where the verified bytes live: the private copy if ``copy_to`` was given (load from
    there), else the original folder (which a local attacker could still change after the check).
    """

    source: Path
    root: Path
    manifest: Manifest
    signer: KeyEntry
    keyset_name: str
    verified_at: datetime

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    @property
    def is_private_copy(self) -> bool:
        return self.root != self.source


# ----------------------------------------------------------------------------- file system helpers


def _open_root(path: Path) -> int:
    if path.is_symlink():
        raise SecurityError(f"bundle folder {path} is a symlink (refused; pass the real folder)")
    try:
        return os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        raise ConfigError(f"bundle folder {path} does not exist; pass --bundle DIR") from None
    except NotADirectoryError:
        raise ConfigError(f"bundle path {path} is not a folder; pass --bundle DIR") from None
    except OSError as exc:
        raise ConfigError(f"cannot open bundle folder {path}: {exc.strerror}") from None


def _open_beneath(root_fd: int, rel: str) -> int:
    """Open ``rel`` under ``root_fd`` refusing symlinks at every component; return a regular-file fd."""
    parts = rel.split("/")
    fds: list[int] = []
    try:
        cur = root_fd
        for part in parts[:-1]:
            try:
                cur = os.open(part, _DIR_FLAGS, dir_fd=cur)
            except OSError:
                raise SecurityError(f"cannot open folder of {rel!r} (missing, or a symlink: refused)") from None
            fds.append(cur)
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=cur)
        except FileNotFoundError:
            raise SecurityError(f"missing file {rel!r}") from None
        except OSError:  # ELOOP: symlink
            raise SecurityError(f"file {rel!r} is a symlink or unreadable (refused)") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise SecurityError(f"{rel!r} is not a regular file (refused)")
        return fd
    finally:
        for d in fds:
            os.close(d)


def _read_small(root_fd: int, rel: str, limit: int) -> bytes:
    fd = _open_beneath(root_fd, rel)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise SecurityError(f"{rel} is larger than the {limit}-byte limit (refused)")
    return data


def list_tree(root_fd: int) -> list[str]:
    """Every regular file under ``root_fd`` as relative POSIX paths; SecurityError on symlinks, special
    files, unsafe names, too many files or too deep nesting."""
    out: list[str] = []

    def walk(fd: int, prefix: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise SecurityError(f"bundle folder {prefix!r} is nested deeper than {MAX_DEPTH} levels")
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = f"{prefix}{e.name}"
            if e.is_symlink():
                raise SecurityError(f"{rel!r} is a symlink (symlinks are refused in bundles)")
            if e.is_dir(follow_symlinks=False):
                sub = os.open(e.name, _DIR_FLAGS, dir_fd=fd)
                try:
                    walk(sub, rel + "/", depth + 1)
                finally:
                    os.close(sub)
            elif e.is_file(follow_symlinks=False):
                out.append(rel)
                if len(out) > MAX_FILES + len(RESERVED):
                    raise SecurityError(f"bundle holds more than {MAX_FILES} files (refused)")
            else:
                raise SecurityError(f"{rel!r} is not a regular file (special files are refused)")

    walk(root_fd, "", 1)
    return out


def hash_stream(src: BinaryIO, expected_size: int | None = None, copy_to: BinaryIO | None = None) -> tuple[int, str]:
    """Stream ``src`` through SHA-256 in 1 MiB chunks, writing the same bytes to ``copy_to`` if given.

    Stops early (SecurityError) once more than ``expected_size`` bytes were read. Returns (size, hex digest).
    """
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    total = 0
    while True:
        n = src.readinto(buf)
        if not n:
            break
        total += n
        if expected_size is not None and total > expected_size:
            raise SecurityError("file is larger than the manifest says")
        h.update(mv[:n])
        if copy_to is not None:
            copy_to.write(mv[:n])
    return total, h.hexdigest()


def _check_safetensors_header(path: str, head: bytes, size: int) -> None:
    if len(head) < 8:
        raise SecurityError(f"{path!r} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or 8 + n > size or n > 100 * (1 << 20) or head[8:9] != b"{":
        raise SecurityError(f"{path!r} is not a safetensors file (bad header)")


# ----------------------------------------------------------------------------- issuing


def issue_bundle(
    proxy_dir: str | Path,
    key: Ed25519PrivateKey,
    *,
    version: int,
    valid_days: int,
    out_dir: str | Path,
    now: datetime | None = None,
    not_before: datetime | None = None,
    bundle_id: str | None = None,
) -> Manifest:
    """Copy ``proxy_dir`` into a new folder ``out_dir`` and sign it: writes MANIFEST.json and MANIFEST.sig.

    Refuses symlinks, special files, unsafe paths and non-allowed file types (pickle weights) in the
    proxy folder; requires config.json, fedproxy.json (with ``base_model_hash``) and a .safetensors
    file. Files are hashed from the same bytes that are copied. Returns the signed manifest.
    """
    now = as_utc(now)
    nb = as_utc(not_before) if not_before is not None else now
    if valid_days <= 0:
        raise ConfigError(f"--valid-days must be positive, got {valid_days}")
    if not isinstance(version, int) or version < 0:
        raise ConfigError(f"--version must be a non-negative integer, got {version!r}")
    proxy_dir, out_dir = Path(proxy_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"--out {out_dir} exists and is not an empty folder; choose a new path")
    root_fd = _open_root(proxy_dir)
    try:
        paths = [p for p in list_tree(root_fd) if p not in RESERVED]
        for p in paths:
            check_path(p)
            check_file_type(p)
        if "fedproxy.json" not in paths:
            raise ConfigError(f"{proxy_dir} has no fedproxy.json; the proxy builder writes it (with base_model_hash)")
        try:
            meta = json.loads(_read_small(root_fd, "fedproxy.json", 4 << 20))
        except ValueError as exc:
            raise ConfigError(f"{proxy_dir}/fedproxy.json is not valid JSON: {exc}") from None
        bmh = meta.get("base_model_hash") if isinstance(meta, dict) else None
        if not isinstance(bmh, str) or not bmh:
            raise ConfigError(f"{proxy_dir}/fedproxy.json has no base_model_hash string; rebuild the proxy")
        out_dir.mkdir(parents=True, exist_ok=True)
        entries = []
        for p in paths:
            dest = out_dir / p
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd = _open_beneath(root_fd, p)
            with os.fdopen(fd, "rb", buffering=0) as src, open(dest, "xb") as dst:
                size, digest = hash_stream(src, copy_to=dst)
            if p.endswith(".safetensors"):
                with open(dest, "rb") as fh:
                    _check_safetensors_header(p, fh.read(16), size)
            entries.append(FileEntry(p, size, digest))
    finally:
        os.close(root_fd)
    manifest = Manifest(
        bundle_id=bundle_id or uuid.uuid4().hex,
        version=version,
        issued_at=now,
        not_before=nb,
        not_after=nb + timedelta(days=valid_days),
        key_id=key_id(key),
        base_model_hash=bmh,
        files=tuple(sorted(entries, key=lambda e: e.path)),
    )
    validate_manifest(manifest)
    data = manifest.to_bytes()
    (out_dir / MANIFEST_NAME).write_bytes(data)
    (out_dir / SIGNATURE_NAME).write_bytes(sign(key, MANIFEST_DOMAIN, data))
    return manifest


# ----------------------------------------------------------------------------- verifying


def _find_signer(keyset: Keyset, sig: bytes, data: bytes) -> KeyEntry:
    for entry in keyset.keys:  # revoked/expired keys too: the status check below names the cause
        if verify_signature(entry.public_key, sig, MANIFEST_DOMAIN, data):
            return entry
    # Diagnose only (nothing below is trusted): was it an unknown key or an edited manifest?
    try:
        claimed = canonical_loads(data, what=MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES).get("key_id")
    except (SecurityError, AttributeError):
        claimed = None
    if isinstance(claimed, str) and keyset.get(claimed) is None:
        raise SecurityError(
            f"MANIFEST.sig does not verify: manifest claims key {claimed[:16]}..., unknown to the pinned keyset "
            f"{keyset.name!r} (wrong key)"
        )
    raise SecurityError(
        "MANIFEST.sig does not verify against MANIFEST.json with any pinned key (manifest edited after signing, "
        "or signature corrupted)"
    )


class _Sink:
    """Receives the hashed bytes: keeps the first ``keep`` bytes and forwards everything to ``out``."""

    def __init__(self, keep: int, out: BinaryIO | None) -> None:
        self.keep, self.out, self.head = keep, out, bytearray()

    def write(self, data: memoryview) -> None:
        if len(self.head) < self.keep:
            self.head += data[: self.keep - len(self.head)]
        if self.out is not None:
            self.out.write(data)


def _verify_files(root_fd: int, manifest: Manifest, copy_to: Path | None) -> bytes:
    """Check the tree and every file; return the verified bytes of fedproxy.json.

    Header checks and fedproxy.json use the very bytes that were hashed (never a second read).
    """
    on_disk = [p for p in list_tree(root_fd) if p not in RESERVED]
    want = manifest.by_path()
    extra = sorted(set(on_disk) - set(want))
    missing = sorted(set(want) - set(on_disk))
    for p in extra:  # name pickle files explicitly: the most dangerous kind of extra file
        try:
            check_file_type(p)
        except SecurityError as exc:
            raise SecurityError(f"extra file not in manifest: {exc}") from None
    if extra or missing:
        parts = []
        if missing:
            parts.append(f"missing file(s) {missing[:5]}")
        if extra:
            parts.append(f"extra file(s) not in manifest {extra[:5]}")
        hint = " (renamed file?)" if extra and missing else ""
        raise SecurityError("bundle files differ from MANIFEST.json: " + "; ".join(parts) + hint)
    meta = b""
    for entry in manifest.files:
        keep = (4 << 20) if entry.path == "fedproxy.json" else 16
        fd = _open_beneath(root_fd, entry.path)
        with os.fdopen(fd, "rb", buffering=0) as src, contextlib.ExitStack() as stack:
            actual = os.fstat(src.fileno()).st_size
            if actual != entry.size:
                raise SecurityError(f"file {entry.path!r} has size {actual}, manifest says {entry.size} (tampered)")
            out = None
            if copy_to is not None:
                dest = copy_to / entry.path
                dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fdo = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                out = stack.enter_context(os.fdopen(fdo, "wb"))
            sink = _Sink(keep, out)
            try:
                size, digest = hash_stream(src, entry.size, sink)  # type: ignore[arg-type]
            except SecurityError:
                raise SecurityError(f"file {entry.path!r} grew while being read (tampered)") from None
        if size != entry.size or not hmac.compare_digest(digest, entry.sha256):
            raise SecurityError(f"SHA-256 mismatch for {entry.path!r}: file content differs from the signed manifest (tampered)")
        if entry.path.endswith(".safetensors"):
            _check_safetensors_header(entry.path, bytes(sink.head), entry.size)
        if entry.path == "fedproxy.json":
            meta = bytes(sink.head)
    return meta


def verify_bundle(
    bundle_dir: str | Path,
    keyset: Keyset,
    *,
    now: datetime | None = None,
    state_dir: str | Path | None = None,
    copy_to: str | Path | None = None,
) -> VerifiedBundle:
    """Verify a bundle against a pinned ``keyset``; return a :class:`VerifiedBundle` or raise SecurityError
    naming the cause (ConfigError for usage errors such as a missing folder).

    With ``state_dir`` the anti-rollback state there is checked and, on success, raised to this
    version. With ``copy_to`` (an existing empty private folder) every file is copied there from the
    very bytes that were hashed, and ``VerifiedBundle.root`` points there.
    """
    now = as_utc(now)
    bundle_dir = Path(bundle_dir)
    dest = Path(copy_to) if copy_to is not None else None
    if dest is not None and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"copy_to {dest} must be an existing empty folder")
    root_fd = _open_root(bundle_dir)
    try:
        try:
            sig = _read_small(root_fd, SIGNATURE_NAME, 64)
        except SecurityError as exc:
            raise SecurityError(f"{SIGNATURE_NAME}: {exc}") from None
        if len(sig) != 64:
            raise SecurityError(f"{SIGNATURE_NAME} must be exactly 64 bytes, has {len(sig)}")
        data = _read_small(root_fd, MANIFEST_NAME, MAX_MANIFEST_BYTES)
        signer = _find_signer(keyset, sig, data)
        manifest = parse_manifest(data)
        if manifest.key_id != signer.key_id:
            raise SecurityError("manifest key_id does not match the key that signed it")
        resolve_key(keyset, signer.key_id, now)
        if now < manifest.not_before:
            raise SecurityError(f"bundle is not valid before {format_time(manifest.not_before)} (future not_before)")
        if now > manifest.not_after:
            raise SecurityError(f"bundle expired at {format_time(manifest.not_after)} (not_after passed)")
        if state_dir is not None:
            check_rollback(state_dir, keyset.name, manifest.base_model_hash, manifest.version, manifest.bundle_id)
        meta_bytes = _verify_files(root_fd, manifest, dest)
        try:
            meta = json.loads(meta_bytes)
        except ValueError:
            raise SecurityError("fedproxy.json is not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("base_model_hash") != manifest.base_model_hash:
            raise SecurityError("fedproxy.json base_model_hash differs from the signed manifest")
    finally:
        os.close(root_fd)
    if state_dir is not None:
        record_accepted(state_dir, keyset.name, manifest.base_model_hash, manifest.version, manifest.bundle_id, now)
    return VerifiedBundle(bundle_dir, dest if dest is not None else bundle_dir, manifest, signer, keyset.name, now)
