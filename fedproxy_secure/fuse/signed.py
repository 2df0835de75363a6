"""Sign and verify a fused-model folder: the proxy-bundle MANIFEST.json/MANIFEST.sig scheme, another kind.

The manifest is canonical JSON::

    {"format": "fedproxy-secure/fused-manifest/v1", "kind": "fused-model", "method": "logit|delta|weight",
     "bundle_id": HEX32, "issued_at": TS, "key_id": HEX64, "base_model_hash": STR,
     "files": [{"path": P, "size": INT, "sha256": HEX64}, ...]}

and MANIFEST.sig is Ed25519 over ``FUSED_DOMAIN + manifest bytes``. The domain differs from the
proxy-bundle domain and the format string differs from the bundle format, so a fused folder's
signature never verifies as a proxy bundle (and a proxy bundle never as a fused folder).

Verification reuses the bundle code's file-system checks (no symlinks, no special or extra files,
no pickle types, O_NOFOLLOW opens, streamed SHA-256 with a private copy made from the very bytes
hashed) and checks the signature before the manifest is parsed and before any model file is read.
"""

from __future__ import annotations

import hmac
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedproxy_secure.artifacts.bundle import (
    _check_safetensors_header,
    _open_beneath,
    _open_root,
    _read_small,
    hash_stream,
    list_tree,
)
from fedproxy_secure.artifacts.canonical import canonical_dumps, canonical_loads
from fedproxy_secure.artifacts.keys import key_id, sign, verify_signature
from fedproxy_secure.artifacts.keyset import KeyEntry, Keyset, resolve_key
from fedproxy_secure.artifacts.manifest import (
    MANIFEST_NAME,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    RESERVED,
    SIGNATURE_NAME,
    check_file_type,
    check_path,
)
from fedproxy_secure.artifacts.timeutil import as_utc, format_time, parse_time
from fedproxy_secure.errors import ConfigError, SecurityError

FUSED_DOMAIN = b"fedproxy-secure/v1/fused-model-manifest\n"
FUSED_FORMAT = "fedproxy-secure/fused-manifest/v1"
FUSED_KIND = "fused-model"
FUSED_META = "fused.json"
METHODS = ("logit", "delta", "weight", "distil-lora")
_FIELDS = frozenset({"format", "kind", "method", "bundle_id", "issued_at", "key_id", "base_model_hash", "files"})

__all__ = ["FUSED_DOMAIN", "FUSED_FORMAT", "FUSED_META", "FusedManifest", "VerifiedFused", "sign_fused_folder",
           "verify_fused_folder"]


@dataclass(frozen=True)
class FusedManifest:
    """A structurally valid fused-folder manifest (its signature is checked over the exact bytes)."""

    method: str
    bundle_id: str
    issued_at: datetime
    key_id: str
    base_model_hash: str
    files: tuple[tuple[str, int, str], ...]  # (path, size, sha256), sorted by path

    def to_bytes(self) -> bytes:
        """The canonical bytes that get signed."""
        return canonical_dumps({
            "format": FUSED_FORMAT, "kind": FUSED_KIND, "method": self.method, "bundle_id": self.bundle_id,
            "issued_at": format_time(self.issued_at), "key_id": self.key_id, "base_model_hash": self.base_model_hash,
            "files": [{"path": p, "size": s, "sha256": h} for p, s, h in self.files],
        })


@dataclass(frozen=True)
class VerifiedFused:
    """A fused folder that passed :func:`verify_fused_folder`; ``root`` holds the verified bytes."""

    source: Path
    root: Path
    manifest: FusedManifest
    signer: KeyEntry


def _parse(data: bytes) -> FusedManifest:
    doc = canonical_loads(data, what=MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES)
    if not isinstance(doc, dict) or set(doc) != _FIELDS:
        raise SecurityError(f"{MANIFEST_NAME}: not a fused-model manifest (fields must be {sorted(_FIELDS)}); "
                            "a proxy bundle is not a fused model")
    if doc["format"] != FUSED_FORMAT or doc["kind"] != FUSED_KIND:
        raise SecurityError(f"{MANIFEST_NAME}: format/kind {doc['format']!r}/{doc['kind']!r} is not a fused model")
    if doc["method"] not in METHODS:
        raise SecurityError(f"{MANIFEST_NAME}: unknown fusion method {doc['method']!r} (known: {', '.join(METHODS)})")
    for name, n in (("bundle_id", 32), ("key_id", 64)):
        v = doc[name]
        if not isinstance(v, str) or len(v) != n or any(c not in "0123456789abcdef" for c in v):
            raise SecurityError(f"{MANIFEST_NAME}: {name} must be {n} lowercase hex characters")
    if not isinstance(doc["base_model_hash"], str) or not 1 <= len(doc["base_model_hash"]) <= 256:
        raise SecurityError(f"{MANIFEST_NAME}: base_model_hash must be a non-empty string")
    files = doc["files"]
    if not isinstance(files, list) or not 1 <= len(files) <= MAX_FILES:
        raise SecurityError(f"{MANIFEST_NAME}: files must be a list of 1..{MAX_FILES} entries")
    out = []
    for i, f in enumerate(files):
        if not isinstance(f, dict) or set(f) != {"path", "size", "sha256"}:
            raise SecurityError(f"{MANIFEST_NAME}: files[{i}] must have exactly path, size, sha256")
        p, s, h = f["path"], f["size"], f["sha256"]
        check_path(p)
        check_file_type(p)
        if p in RESERVED:
            raise SecurityError(f"{MANIFEST_NAME}: lists reserved file {p!r}")
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise SecurityError(f"{MANIFEST_NAME}: files[{i}].size must be a non-negative integer")
        if not isinstance(h, str) or len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
            raise SecurityError(f"{MANIFEST_NAME}: files[{i}].sha256 must be 64 lowercase hex characters")
        out.append((p, s, h))
    if [p for p, _, _ in out] != sorted({p for p, _, _ in out}):
        raise SecurityError(f"{MANIFEST_NAME}: files must be sorted by path and unique")
    if FUSED_META not in {p for p, _, _ in out}:
        raise SecurityError(f"{MANIFEST_NAME}: does not list {FUSED_META}")
    return FusedManifest(doc["method"], doc["bundle_id"], parse_time(doc["issued_at"], "manifest issued_at"),
                         doc["key_id"], doc["base_model_hash"], tuple(out))


def sign_fused_folder(folder: str | Path, key: Ed25519PrivateKey, *, method: str, base_model_hash: str,
                      now: datetime | None = None) -> FusedManifest:
    """Hash every file of ``folder`` and write MANIFEST.json + MANIFEST.sig (domain ``FUSED_DOMAIN``).

    Guarantees: refuses (SecurityError) symlinks, special files, unsafe names and pickle-capable
    file types; requires ``fused.json``; the manifest lists exactly the folder's files.
    """
    if method not in METHODS:
        raise ConfigError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    folder = Path(folder)
    root = _open_root(folder)
    try:
        entries = []
        for p in list_tree(root):
            if p in RESERVED:
                raise SecurityError(f"{folder}: already holds {p}; sign a freshly written folder")
            check_path(p)
            check_file_type(p)
            fd = _open_beneath(root, p)
            with os.fdopen(fd, "rb", buffering=0) as fh:
                size, digest = hash_stream(fh)
            entries.append((p, size, digest))
    finally:
        os.close(root)
    if FUSED_META not in {p for p, _, _ in entries}:
        raise ConfigError(f"{folder}: no {FUSED_META}; write the fusion metadata before signing")
    m = FusedManifest(method, uuid.uuid4().hex, as_utc(now), key_id(key), base_model_hash, tuple(sorted(entries)))
    data = m.to_bytes()
    (folder / MANIFEST_NAME).write_bytes(data)
    (folder / SIGNATURE_NAME).write_bytes(sign(key, FUSED_DOMAIN, data))
    return m


def _find_signer(keyset: Keyset, sig: bytes, data: bytes) -> KeyEntry:
    for entry in keyset.keys:
        if verify_signature(entry.public_key, sig, FUSED_DOMAIN, data):
            return entry
    raise SecurityError(f"{SIGNATURE_NAME}: does not verify as a fused model with any key of the pinned keyset "
                        f"{keyset.name!r} (wrong key, edited manifest, or not a fused-model folder)")


def verify_fused_folder(folder: str | Path, keyset: Keyset, *, copy_to: str | Path | None = None,
                        now: datetime | None = None) -> VerifiedFused:
    """Verify a fused folder against ``keyset``; with ``copy_to`` copy each file there from the hashed bytes.

    Order: signature over the raw manifest bytes (before parsing), key usable at ``now``, exact
    file set (no extra, missing, symlinked or pickle files), then each file's size and SHA-256
    (constant-time compare) and safetensors header. Raises SecurityError naming the cause; reads
    no model file before the signature has verified.
    """
    now = as_utc(now)
    folder = Path(folder)
    dest = Path(copy_to) if copy_to is not None else None
    if dest is not None and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"copy_to {dest} must be an existing empty folder")
    root = _open_root(folder)
    try:
        try:
            sig = _read_small(root, SIGNATURE_NAME, 64)
            data = _read_small(root, MANIFEST_NAME, MAX_MANIFEST_BYTES)
        except SecurityError as exc:
            raise SecurityError(f"{folder}: not a signed fused-model folder ({exc})") from None
        if len(sig) != 64:
            raise SecurityError(f"{SIGNATURE_NAME} must be exactly 64 bytes, has {len(sig)}")
        signer = _find_signer(keyset, sig, data)
        m = _parse(data)
        if m.key_id != signer.key_id:
            raise SecurityError("manifest key_id does not match the key that signed it")
        resolve_key(keyset, signer.key_id, now)
        on_disk = [p for p in list_tree(root) if p not in RESERVED]
        want = {p: (s, h) for p, s, h in m.files}
        extra, missing = sorted(set(on_disk) - set(want)), sorted(set(want) - set(on_disk))
        if extra or missing:
            raise SecurityError(f"fused folder files differ from {MANIFEST_NAME}: missing {missing[:5]}, extra {extra[:5]}")
        for p, (size, sha) in sorted(want.items()):
            fd = _open_beneath(root, p)
            with os.fdopen(fd, "rb", buffering=0) as src:
                if os.fstat(src.fileno()).st_size != size:
                    raise SecurityError(f"file {p!r} has a different size than the signed manifest (tampered)")
                sink: Any = None
                if dest is not None:
                    (dest / p).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    sink = open(os.open(dest / p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb")
                try:
                    got_size, digest = hash_stream(src, size, sink)
                except SecurityError:
                    raise SecurityError(f"file {p!r} grew while being read (tampered)") from None
                finally:
                    if sink is not None:
                        sink.close()
            if got_size != size or not hmac.compare_digest(digest, sha):
                raise SecurityError(f"SHA-256 mismatch for {p!r}: content differs from the signed manifest (tampered)")
            if p.endswith(".safetensors") and dest is not None:
                with open(dest / p, "rb") as fh:
                    _check_safetensors_header(p, fh.read(16), size)
    finally:
        os.close(root)
    return VerifiedFused(folder, dest if dest is not None else folder, m, signer)
