"""Signed proxy bundles: keys, pinned keysets with rotation/revocation, manifests, verification,
anti-rollback state, and the only model loader clients use (verify first, then load).

Imports no heavy libraries: transformers is imported inside :func:`load_verified_proxy` only.
"""

from .bundle import VerifiedBundle, issue_bundle, verify_bundle
from .canonical import canonical_dumps, canonical_loads
from .keys import (
    KEYSET_DOMAIN,
    MANIFEST_DOMAIN,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    read_passphrase,
    save_private_key,
    save_public_key,
)
from .keyset import (
    KeyEntry,
    Keyset,
    create_keyset,
    load_keyset,
    parse_keyset,
    resolve_key,
    revoke_key,
    rotate_keyset,
    save_keyset,
    update_pin,
)
from .loader import load_verified_proxy
from .manifest import FileEntry, Manifest, parse_manifest
from .rollback import highest_accepted

__all__ = [
    "KEYSET_DOMAIN",
    "MANIFEST_DOMAIN",
    "FileEntry",
    "KeyEntry",
    "Keyset",
    "Manifest",
    "VerifiedBundle",
    "canonical_dumps",
    "canonical_loads",
    "create_keyset",
    "generate_key",
    "highest_accepted",
    "issue_bundle",
    "key_id",
    "load_keyset",
    "load_private_key",
    "load_public_key",
    "load_verified_proxy",
    "parse_keyset",
    "parse_manifest",
    "read_passphrase",
    "resolve_key",
    "revoke_key",
    "rotate_keyset",
    "save_keyset",
    "save_private_key",
    "save_public_key",
    "update_pin",
    "verify_bundle",
]
