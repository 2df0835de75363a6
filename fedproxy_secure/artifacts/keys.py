"""Ed25519 server keys: generation, storage (0600, optional passphrase), key ids, signing.

Key files are written and read through :mod:`fedproxy_secure.artifacts.keyfiles` (exclusive 0600
creation; loading refuses a group- or world-accessible file).

Every signature is domain-separated: the signed message is ``DOMAIN + payload`` where DOMAIN is
``b"fedproxy-secure/v1/manifest\\n"`` for bundle manifests and ``b"fedproxy-secure/v1/keyset\\n"``
for keysets, so a signature over one kind of document can never be replayed as the other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedproxy_secure.artifacts.keyfiles import is_encrypted_pem, read_private_file, save_pem_private_key
from fedproxy_secure.errors import ConfigError, SecurityError

MANIFEST_DOMAIN = b"fedproxy-secure/v1/manifest\n"
KEYSET_DOMAIN = b"fedproxy-secure/v1/keyset\n"
PASSPHRASE_ENV = "FEDPROXY_KEY_PASSPHRASE"

__all__ = [
    "MANIFEST_DOMAIN",
    "KEYSET_DOMAIN",
    "PASSPHRASE_ENV",
    "generate_key",
    "key_id",
    "public_key_b64",
    "public_key_from_b64",
    "save_private_key",
    "load_private_key",
    "save_operator_key",
    "load_operator_key",
    "save_public_key",
    "load_public_key",
    "sign",
    "verify_signature",
    "read_passphrase",
]


def generate_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 signing key from the OS CSPRNG (via ``cryptography``)."""
    return Ed25519PrivateKey.generate()


def _raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(pub: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Key id = lowercase hex SHA-256 of the 32-byte raw public key."""
    if isinstance(pub, Ed25519PrivateKey):
        pub = pub.public_key()
    return hashlib.sha256(_raw(pub)).hexdigest()


def public_key_b64(pub: Ed25519PublicKey) -> str:
    """Standard base64 of the 32-byte raw public key (the form stored in keysets)."""
    return base64.b64encode(_raw(pub)).decode("ascii")


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """Parse a base64 raw Ed25519 public key; SecurityError if malformed."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise SecurityError("keyset public_key is not valid base64") from None
    if len(raw) != 32:
        raise SecurityError(f"keyset public_key must be 32 raw bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def save_private_key(key: Ed25519PrivateKey, path: str | Path, passphrase: bytes | None = None) -> None:
    """Write ``key`` as PKCS#8 PEM, created exclusively with mode 0600; encrypted
    (BestAvailableEncryption) if a passphrase is given. Refuses to overwrite an existing file (ConfigError)."""
    save_pem_private_key(key, path, passphrase)


def load_private_key(path: str | Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key; SecurityError if the file is group/world-accessible (names
    ``chmod 600 FILE``), ConfigError if missing, not Ed25519, or the passphrase is wrong/missing/superfluous."""
    path = Path(path)
    data = read_private_file(path)
    if is_encrypted_pem(data) and not passphrase:
        raise ConfigError(f"private key {path} is passphrase-protected: set {PASSPHRASE_ENV} or pass --passphrase-file")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError:
        raise ConfigError(
            f"private key {path} is passphrase-protected: set {PASSPHRASE_ENV} or pass --passphrase-file"
            if not passphrase
            else f"private key {path} is not encrypted; do not pass a passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"cannot decrypt/parse private key {path}: wrong passphrase or not a PEM key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"private key {path} is not an Ed25519 key")
    return key


def save_operator_key(key: Ed25519PrivateKey, path: str | Path, env: dict[str, str] | None = None) -> bool:
    """Write the operator's round-config signing key (0600, exclusive), encrypted with the passphrase
    in ``FEDPROXY_OPERATOR_PASSPHRASE`` when set. Returns True iff it was encrypted."""
    from fedproxy_secure.artifacts.keyfiles import operator_passphrase

    pp = operator_passphrase(env)
    save_pem_private_key(key, path, pp)
    return pp is not None


def load_operator_key(path: str | Path, env: dict[str, str] | None = None) -> Ed25519PrivateKey:
    """Load the operator key written by :func:`save_operator_key`: permission-checked, decrypted with
    ``FEDPROXY_OPERATOR_PASSPHRASE`` when encrypted (ConfigError naming the variable when it is unset
    or wrong), ConfigError if it is not Ed25519."""
    from fedproxy_secure.artifacts.keyfiles import load_pem_private_key_file, operator_passphrase

    key = load_pem_private_key_file(path, operator_passphrase(env))
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"operator key {path} is not an Ed25519 key")
    return key


def save_public_key(pub: Ed25519PublicKey, path: str | Path) -> None:
    """Write the public key as SubjectPublicKeyInfo PEM (mode 0644)."""
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    Path(path).write_bytes(pem)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load a PEM Ed25519 public key; ConfigError if unreadable or not Ed25519."""
    try:
        pub = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"cannot load public key {path}: {exc}") from None
    if not isinstance(pub, Ed25519PublicKey):
        raise ConfigError(f"public key {path} is not an Ed25519 key")
    return pub


def sign(key: Ed25519PrivateKey, domain: bytes, payload: bytes) -> bytes:
    """Ed25519 signature (64 bytes) over ``domain + payload``."""
    return key.sign(domain + payload)


def verify_signature(pub: Ed25519PublicKey, signature: bytes, domain: bytes, payload: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature by ``pub`` over ``domain + payload``."""
    if len(signature) != 64:
        return False
    try:
        pub.verify(signature, domain + payload)
    except InvalidSignature:
        return False
    return True


def read_passphrase(passphrase_file: str | Path | None = None, env: dict[str, str] | None = None) -> bytes | None:
    """Passphrase from ``passphrase_file`` (first line) or else the FEDPROXY_KEY_PASSPHRASE env var; None if neither."""
    if passphrase_file is not None:
        try:
            text = Path(passphrase_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read --passphrase-file {passphrase_file}: {exc.strerror}") from None
        line = text.splitlines()[0] if text else ""
        if not line:
            raise ConfigError(f"--passphrase-file {passphrase_file} is empty")
        return line.encode("utf-8")
    value = (env if env is not None else os.environ).get(PASSPHRASE_ENV)
    return value.encode("utf-8") if value else None
