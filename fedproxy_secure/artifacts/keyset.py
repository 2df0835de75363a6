"""Signed keysets: which server keys a client trusts, rotation and revocation.

A keyset file is canonical JSON ``{"keyset": PAYLOAD, "signed_by": KEY_ID, "signature": B64}``
where the signature is Ed25519 over ``KEYSET_DOMAIN + canonical(PAYLOAD)``. PAYLOAD holds a
deployment ``name``, a monotonically increasing ``serial``, ``issued_at`` and a list of keys
``{key_id, public_key, valid_from, valid_to, status}`` with status ``active`` or ``revoked``.

Trust model: a client *pins* one keyset file obtained out of band. It moves its pin forward only
through :func:`update_pin`, which accepts a newer keyset only if it is signed by a key that is
active (not revoked, inside its validity window) in the currently pinned keyset, has the same
name and a higher serial, and keeps every revocation of the pinned keyset (revocation is sticky).
Rotation = the current key signs a keyset that adds the next key; revocation = an active key
signs a keyset marking another key id ``revoked``.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedproxy_secure.errors import ConfigError, SecurityError

from .canonical import canonical_dumps, canonical_loads
from .keys import KEYSET_DOMAIN, key_id, public_key_b64, public_key_from_b64, sign, verify_signature
from .timeutil import as_utc, format_time, parse_time

KEYSET_FORMAT = "fedproxy-secure/keyset/v1"
MAX_KEYSET_BYTES = 256 * 1024
MAX_KEYS = 256
STATUSES = ("active", "revoked")

__all__ = [
    "KeyEntry",
    "Keyset",
    "create_keyset",
    "parse_keyset",
    "load_keyset",
    "save_keyset",
    "rotate_keyset",
    "revoke_key",
    "update_pin",
    "resolve_key",
]


@dataclass(frozen=True)
class KeyEntry:
    """One trusted key: id, public key, validity window and status."""

    key_id: str
    public_key: Ed25519PublicKey
    valid_from: datetime
    valid_to: datetime
    status: str

    def to_json(self) -> dict[str, Any]:
        """The entry as stored in a keyset payload."""
        return {
            "key_id": self.key_id,
            "public_key": public_key_b64(self.public_key),
            "valid_from": format_time(self.valid_from),
            "valid_to": format_time(self.valid_to),
            "status": self.status,
        }

    def usable_at(self, when: datetime) -> bool:
        """Active and ``valid_from <= when <= valid_to``."""
        return self.status == "active" and self.valid_from <= when <= self.valid_to


@dataclass(frozen=True)
class Keyset:
    """A parsed keyset whose signature has been checked by :func:`parse_keyset` or made by this module."""

    name: str
    serial: int
    issued_at: datetime
    keys: tuple[KeyEntry, ...]
    signed_by: str
    signature: bytes

    def payload(self) -> dict[str, Any]:
        """The signed part of the keyset (keys sorted by key id)."""
        return {
            "format": KEYSET_FORMAT,
            "name": self.name,
            "serial": self.serial,
            "issued_at": format_time(self.issued_at),
            "keys": [k.to_json() for k in sorted(self.keys, key=lambda k: k.key_id)],
        }

    def to_bytes(self) -> bytes:
        """The canonical file bytes."""
        return canonical_dumps(
            {"keyset": self.payload(), "signed_by": self.signed_by, "signature": base64.b64encode(self.signature).decode()}
        )

    def get(self, kid: str) -> KeyEntry | None:
        """The entry with key id ``kid``, whatever its status, or None."""
        for k in self.keys:
            if k.key_id == kid:
                return k
        return None


def _signed(name: str, serial: int, issued_at: datetime, keys: Sequence[KeyEntry], signer: Ed25519PrivateKey) -> Keyset:
    unsigned = Keyset(name, serial, issued_at, tuple(sorted(keys, key=lambda k: k.key_id)), key_id(signer), b"")
    sig = sign(signer, KEYSET_DOMAIN, canonical_dumps(unsigned.payload()))
    return replace(unsigned, signature=sig)


def create_keyset(
    key: Ed25519PrivateKey, *, name: str | None = None, valid_days: int = 365, now: datetime | None = None
) -> Keyset:
    """A first keyset (serial 1) holding only ``key``, self-signed; ``name`` defaults to ``fedproxy-<kid[:16]>``."""
    now = as_utc(now)
    if valid_days <= 0:
        raise ConfigError(f"--valid-days must be positive, got {valid_days}")
    kid = key_id(key)
    entry = KeyEntry(kid, key.public_key(), now, now + timedelta(days=valid_days), "active")
    return _signed(name or f"fedproxy-{kid[:16]}", 1, now, [entry], key)


def _parse_entry(obj: Any, i: int) -> KeyEntry:
    where = f"keyset.keys[{i}]"
    if not isinstance(obj, dict) or set(obj) != {"key_id", "public_key", "valid_from", "valid_to", "status"}:
        raise SecurityError(f"{where} must have exactly key_id, public_key, valid_from, valid_to, status")
    pub = public_key_from_b64(obj["public_key"])
    kid = key_id(pub)
    if obj["key_id"] != kid:
        raise SecurityError(f"{where}.key_id does not equal SHA-256 of its public key")
    if obj["status"] not in STATUSES:
        raise SecurityError(f"{where}.status must be one of {STATUSES}, got {obj['status']!r}")
    vf, vt = parse_time(obj["valid_from"], f"{where}.valid_from"), parse_time(obj["valid_to"], f"{where}.valid_to")
    if vt < vf:
        raise SecurityError(f"{where}: valid_to is before valid_from")
    return KeyEntry(kid, pub, vf, vt, obj["status"])


def parse_keyset(data: bytes, *, source: str = "keyset") -> Keyset:
    """Parse and check a keyset file: canonical JSON, well-formed entries, and a valid signature by a
    non-revoked key listed in the keyset itself whose validity covers ``issued_at``.

    This proves internal consistency only; *trust* comes from pinning (see :func:`update_pin`).
    """
    doc = canonical_loads(data, what=source, max_bytes=MAX_KEYSET_BYTES)
    if not isinstance(doc, dict) or set(doc) != {"keyset", "signed_by", "signature"}:
        raise SecurityError(f"{source} must be an object with exactly keyset, signed_by, signature")
    p = doc["keyset"]
    if not isinstance(p, dict) or set(p) != {"format", "name", "serial", "issued_at", "keys"}:
        raise SecurityError(f"{source}: keyset must have exactly format, name, serial, issued_at, keys")
    if p["format"] != KEYSET_FORMAT:
        raise SecurityError(f"{source}: unknown keyset format {p['format']!r} (expected {KEYSET_FORMAT})")
    if not isinstance(p["name"], str) or not p["name"] or len(p["name"]) > 128:
        raise SecurityError(f"{source}: keyset.name must be a non-empty string of at most 128 characters")
    if not isinstance(p["serial"], int) or isinstance(p["serial"], bool) or p["serial"] < 1:
        raise SecurityError(f"{source}: keyset.serial must be a positive integer")
    if not isinstance(p["keys"], list) or not 1 <= len(p["keys"]) <= MAX_KEYS:
        raise SecurityError(f"{source}: keyset.keys must list 1..{MAX_KEYS} keys")
    keys = tuple(_parse_entry(k, i) for i, k in enumerate(p["keys"]))
    if len({k.key_id for k in keys}) != len(keys):
        raise SecurityError(f"{source}: duplicate key_id in keyset.keys")
    try:
        sig = base64.b64decode(doc["signature"], validate=True) if isinstance(doc["signature"], str) else b""
    except (binascii.Error, ValueError):
        sig = b""
    ks = Keyset(p["name"], p["serial"], parse_time(p["issued_at"], f"{source}: keyset.issued_at"), keys, str(doc["signed_by"]), sig)
    if ks.payload() != p:  # keys must already be sorted by key_id
        raise SecurityError(f"{source}: keyset.keys must be sorted by key_id")
    signer = ks.get(ks.signed_by)
    if signer is None:
        raise SecurityError(f"{source}: signed_by {ks.signed_by[:16]}... is not a key listed in the keyset")
    if signer.status == "revoked":
        raise SecurityError(f"{source}: signed by revoked key {signer.key_id[:16]}...")
    if not signer.valid_from <= ks.issued_at <= signer.valid_to:
        raise SecurityError(f"{source}: signing key {signer.key_id[:16]}... was not valid at issued_at")
    if not verify_signature(signer.public_key, sig, KEYSET_DOMAIN, canonical_dumps(p)):
        raise SecurityError(f"{source}: keyset signature is invalid (edited after signing or corrupted)")
    return ks


def load_keyset(path: str | Path) -> Keyset:
    """Read and check a keyset file (see :func:`parse_keyset`); ConfigError if it cannot be read."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_KEYSET_BYTES:
            raise SecurityError(f"keyset {path} is over {MAX_KEYSET_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read keyset {path}: {exc.strerror}; pass --keyset with your pinned keyset.json") from None
    return parse_keyset(data, source=f"keyset {path}")


def atomic_write(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, os.replace)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_keyset(ks: Keyset, path: str | Path) -> None:
    """Write ``ks`` as canonical JSON, atomically."""
    atomic_write(path, ks.to_bytes())


def _require_signer(current: Keyset, signer: Ed25519PrivateKey, now: datetime, action: str) -> None:
    entry = current.get(key_id(signer))
    if entry is None:
        raise ConfigError(f"{action}: the signing key {key_id(signer)[:16]}... is not in the current keyset")
    if not entry.usable_at(now):
        raise ConfigError(f"{action}: the signing key {entry.key_id[:16]}... is {entry.status} or outside its validity window")


def rotate_keyset(
    current: Keyset,
    current_key: Ed25519PrivateKey,
    new_public: Ed25519PublicKey,
    *,
    valid_days: int = 365,
    now: datetime | None = None,
) -> Keyset:
    """Next keyset (serial+1) adding ``new_public`` as active, signed by ``current_key``.

    ``current_key`` must be active and valid in ``current`` at ``now``. Older keys keep their status
    and validity (bundles they signed keep verifying until they expire or are revoked).
    """
    now = as_utc(now)
    _require_signer(current, current_key, now, "rotate-key")
    kid = key_id(new_public)
    if current.get(kid) is not None:
        raise ConfigError(f"rotate-key: key {kid[:16]}... is already in the keyset; generate a new key")
    if valid_days <= 0:
        raise ConfigError(f"--valid-days must be positive, got {valid_days}")
    entry = KeyEntry(kid, new_public, now, now + timedelta(days=valid_days), "active")
    return _signed(current.name, current.serial + 1, now, [*current.keys, entry], current_key)


def revoke_key(current: Keyset, signer: Ed25519PrivateKey, revoke_id: str, *, now: datetime | None = None) -> Keyset:
    """Next keyset (serial+1) marking ``revoke_id`` revoked, signed by another active key ``signer``."""
    now = as_utc(now)
    _require_signer(current, signer, now, "revoke-key")
    if key_id(signer) == revoke_id:
        raise ConfigError("revoke-key: a key cannot sign its own revocation; rotate to a new key first, then revoke with it")
    target = current.get(revoke_id)
    if target is None:
        raise ConfigError(f"revoke-key: key id {revoke_id} is not in the keyset")
    keys = [replace(k, status="revoked") if k.key_id == revoke_id else k for k in current.keys]
    return _signed(current.name, current.serial + 1, now, keys, signer)


def update_pin(pinned: Keyset, chain: Sequence[Keyset], *, now: datetime | None = None) -> Keyset:
    """Walk ``chain`` from ``pinned``; return the newest keyset reached. SecurityError on any broken link.

    Each link must: have the same name, a strictly higher serial, be signed by a key usable (active,
    within validity at ``now``) in the previous keyset, and keep every key the previous keyset revoked
    revoked.
    """
    now = as_utc(now)
    cur = pinned
    for nxt in chain:
        if nxt.name != cur.name:
            raise SecurityError(f"keyset name {nxt.name!r} differs from pinned {cur.name!r}")
        if nxt.serial <= cur.serial:
            raise SecurityError(f"keyset serial {nxt.serial} is not newer than pinned serial {cur.serial} (rollback)")
        signer = cur.get(nxt.signed_by)
        if signer is None:
            raise SecurityError(f"keyset serial {nxt.serial} is signed by key {nxt.signed_by[:16]}... unknown to the pinned keyset")
        if signer.status == "revoked":
            raise SecurityError(f"keyset serial {nxt.serial} is signed by revoked key {signer.key_id[:16]}...")
        if not signer.usable_at(now):
            raise SecurityError(f"keyset serial {nxt.serial} is signed by expired key {signer.key_id[:16]}...")
        for k in cur.keys:
            if k.status == "revoked":
                n = nxt.get(k.key_id)
                if n is not None and n.status != "revoked":
                    raise SecurityError(f"keyset serial {nxt.serial} un-revokes key {k.key_id[:16]}... (refused)")
        cur = nxt
    return cur


def resolve_key(ks: Keyset, kid: str, now: datetime) -> KeyEntry:
    """The entry for ``kid`` if usable at ``now``; SecurityError naming the cause (unknown, revoked, expired, not yet valid)."""
    entry = ks.get(kid)
    if entry is None:
        raise SecurityError(f"signing key {kid[:16]}... is unknown to the pinned keyset {ks.name!r} (wrong key)")
    if entry.status == "revoked":
        raise SecurityError(f"signing key {kid[:16]}... is revoked in the pinned keyset {ks.name!r}")
    if now > entry.valid_to:
        raise SecurityError(f"signing key {kid[:16]}... expired at {format_time(entry.valid_to)}")
    if now < entry.valid_from:
        raise SecurityError(f"signing key {kid[:16]}... is not valid before {format_time(entry.valid_from)}")
    return entry
