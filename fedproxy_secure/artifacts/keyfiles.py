"""Private key files at rest: the one module that writes and reads them.

Guarantees, for every private key and secret the SDK writes (operator, server and CA keys, site
TLS and identity keys, HE statement key, audit-log secret, enrolment tokens):

* created atomically with ``os.open(O_CREAT | O_EXCL | O_NOFOLLOW, 0o600)``: the file never exists
  with wider permissions, not even for an instant, and an existing file or symlink is never
  followed or silently overwritten (``replace=True`` writes a fresh 0600 file next to it and
  renames it over the old one);
* loading refuses a file readable or writable by group or others, naming the file and the fix
  (``chmod 600 FILE``); the mode is checked on the opened descriptor (no check-then-open race);
* the operator's round-config signing key is encrypted at rest (PKCS#8,
  ``BestAvailableEncryption``) with the passphrase in the environment variable
  ``FEDPROXY_OPERATOR_PASSPHRASE`` (read by ``server init`` and by the server process; there is no
  interactive prompt because the server runs unattended). Without it the key is written
  unencrypted and ``server init`` warns; ``audit check --server-dir`` reports it.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from fedproxy_secure.errors import ConfigError, SecurityError

OPERATOR_PASSPHRASE_ENV = "FEDPROXY_OPERATOR_PASSPHRASE"
PRIVATE_MODE = 0o600

__all__ = ["OPERATOR_PASSPHRASE_ENV", "PRIVATE_MODE", "write_private_file", "read_private_file",
           "check_private_file", "save_pem_private_key", "load_pem_private_key_file", "is_encrypted_pem",
           "operator_passphrase", "new_secret_file", "read_secret_file"]


def _create_exclusive(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)  # the umask cannot widen it, and a stricter umask is undone
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_file(path: str | os.PathLike, data: bytes, *, replace: bool = False) -> Path:
    """Write ``data`` to a new file with mode 0600, created exclusively (never following a symlink).

    Refuses (ConfigError naming the file) if ``path`` exists, unless ``replace``: then a fresh 0600
    file is written beside it and atomically renamed over it. Creates missing parent folders
    (mode 0700). Returns the path.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not replace:
        if p.exists() or p.is_symlink():
            raise ConfigError(f"{p} already exists; refusing to overwrite a private key or secret "
                              "(move it aside or choose another path)")
        _create_exclusive(p, data)
        return p
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(6)}.tmp")
    _create_exclusive(tmp, data)
    try:
        os.replace(tmp, p)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return p


def _refuse_open_mode(p: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise SecurityError(f"private key {p} is not a regular file")
    if mode & 0o077:
        raise SecurityError(f"private key {p} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
                            f"run: chmod 600 {p}")


def check_private_file(path: str | os.PathLike) -> None:
    """Raise SecurityError naming ``path`` and the fix unless it is a regular file of mode 0600 or stricter."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise ConfigError(f"cannot read private key {p}: {exc.strerror}") from None
    _refuse_open_mode(p, st.st_mode)


def read_private_file(path: str | os.PathLike) -> bytes:
    """The bytes of a private key file, after checking (on the open descriptor) that group and others
    have no access; SecurityError naming the file and ``chmod 600 FILE`` otherwise, ConfigError if unreadable."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"cannot read private key {p}: {exc.strerror}") from None
    try:
        _refuse_open_mode(p, os.fstat(fd).st_mode)
        chunks = []
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def is_encrypted_pem(data: bytes) -> bool:
    """True iff ``data`` is an encrypted PKCS#8 PEM private key."""
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data


def save_pem_private_key(key, path: str | os.PathLike, passphrase: bytes | None = None, *,
                         replace: bool = False) -> Path:
    """Write any ``cryptography`` private key as PKCS#8 PEM, 0600, encrypted with ``passphrase``
    (``BestAvailableEncryption``) when one is given; see :func:`write_private_file` for ``replace``."""
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    return write_private_file(path, pem, replace=replace)


def load_pem_private_key_file(path: str | os.PathLike, passphrase: bytes | None = None, *,
                              passphrase_hint: str = OPERATOR_PASSPHRASE_ENV):
    """Load a PEM private key after the permission check of :func:`read_private_file`.

    An unencrypted key loads whether or not a passphrase is given; an encrypted one needs it
    (ConfigError naming ``passphrase_hint``, the variable or option that supplies it). A wrong
    passphrase or a non-PEM file is a ConfigError naming the file.
    """
    p = Path(path)
    data = read_private_file(p)
    encrypted = is_encrypted_pem(data)
    if encrypted and not passphrase:
        raise ConfigError(f"private key {p} is passphrase-protected: set {passphrase_hint}")
    try:
        return serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"cannot decrypt/parse private key {p}: wrong passphrase or not a PEM key") from None


def operator_passphrase(env: dict[str, str] | None = None) -> bytes | None:
    """The operator-key passphrase from ``FEDPROXY_OPERATOR_PASSPHRASE`` (None when unset or empty).

    Raises ConfigError for a passphrase under 12 characters (the key file's only protection)."""
    value = (env if env is not None else os.environ).get(OPERATOR_PASSPHRASE_ENV)
    if not value:
        return None
    if len(value) < 12:
        raise ConfigError(f"{OPERATOR_PASSPHRASE_ENV} is {len(value)} characters; use at least 12")
    return value.encode("utf-8")


def new_secret_file(path: str | os.PathLike, nbytes: int = 32) -> bytes:
    """Create ``path`` (0600, exclusive) holding ``nbytes`` fresh random bytes; returns them."""
    secret = secrets.token_bytes(nbytes)
    write_private_file(path, secret)
    return secret


def read_secret_file(path: str | os.PathLike, nbytes: int = 32) -> bytes:
    """Read a secret written by :func:`new_secret_file` (permission-checked; exactly ``nbytes`` long)."""
    data = read_private_file(path)
    if len(data) != nbytes:
        raise SecurityError(f"secret file {path} holds {len(data)} bytes, expected {nbytes}; it was altered")
    return data
