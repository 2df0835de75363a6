"""Site identity fingerprints: what sites compare out of band to build a cohort roster.

A site's fingerprint is the domain-separated SHA-256 of its enrolled Ed25519 identity public key
(the key that signs its requests and its key-agreement messages). ``client roster`` prints it; the
sites of a federation exchange fingerprints over a channel the operator does not control (a call,
a signed e-mail between the institutions' security contacts) and list each other's in
``client.yaml``'s ``policy.roster``. A round config whose cohort lists identities outside the
roster is then refused (:mod:`fedproxy_secure.client.policy`), so a server cannot fill seats with
members it enrolled itself. Both the server (to show fingerprints) and the site use this module.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["FINGERPRINT_LABEL", "identity_fingerprint", "normalise_fingerprint", "format_fingerprint"]

FINGERPRINT_LABEL = b"fedproxy-secure/v1/site-identity-fingerprint\n"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def identity_fingerprint(raw_public_key: bytes) -> str:
    """Lowercase hex SHA-256 over :data:`FINGERPRINT_LABEL` and the 32-byte raw Ed25519 public key."""
    raw = bytes(raw_public_key)
    if len(raw) != 32:
        raise ValueError("an identity fingerprint needs the 32-byte raw Ed25519 public key")
    return hashlib.sha256(FINGERPRINT_LABEL + raw).hexdigest()


def normalise_fingerprint(text: str) -> str:
    """``text`` as 64 lowercase hex characters (spaces, colons and dashes between groups are dropped).

    Raises ``ValueError`` naming what is wrong, for pydantic to report with the field name.
    """
    if not isinstance(text, str):
        raise ValueError("a fingerprint is a string of 64 hex characters")
    fp = re.sub(r"[\s:\-]", "", text).lower()
    if not _HEX64.match(fp):
        raise ValueError(f"{text!r} is not a site fingerprint (64 hex characters, from 'client roster')")
    return fp


def format_fingerprint(fp: str) -> str:
    """The fingerprint in groups of four, for reading aloud or comparing by eye."""
    return " ".join(fp[i:i + 4] for i in range(0, len(fp), 4))
