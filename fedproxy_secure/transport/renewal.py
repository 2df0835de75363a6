"""Certificate renewal (``client renew``): the request both roles agree on and the proof of the current key.

A site renews on the enrolment listener (TLS that authenticates the server only, so a certificate that
expired within the grace window can still renew) with ``POST /v1/renew``, body :class:`RenewRequest`:

- the request is signed (``transport.signing``) by the site's Ed25519 identity key under its client id: the
  server verifies that signature against the enrolled, not revoked identity before it parses the body;
- ``cert`` is the site's current client certificate, ``csr`` a CSR for the new one (the same TLS key, or a
  new one with ``--rotate-tls-key``), and ``pop`` an ECDSA P-256 signature by the current certificate's key
  over :func:`pop_message` (domain-separated; binds the client id, the current certificate and the CSR).

So a renewal needs both the identity key and the current certificate key; the identity (client id, site
name, identity key) does not change, and nothing in the site's state folder (privacy budget) is touched.
"""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field

from fedproxy_secure.errors import SecurityError

RENEW_PATH = "/v1/renew"
RENEW_DOMAIN = b"fedproxy-secure/v1/cert-renewal\x00"
#: days after ``not_after`` during which an expired certificate may still renew (the server's default)
RENEW_GRACE_DAYS = 7


class RenewRequest(BaseModel):
    """Body of ``POST /v1/renew`` (PEM texts and a base64url signature; nothing else accepted)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cert: str = Field(min_length=1, max_length=8 << 10)
    csr: str = Field(min_length=1, max_length=8 << 10)
    pop: str = Field(min_length=1, max_length=256)


def pop_message(client_id: str, cert_pem: bytes, csr_pem: bytes) -> bytes:
    """What the current certificate key signs: the domain, then SHA-256 of the client id, the certificate
    and the CSR (fixed length, so no field can be shifted into another). Pure."""
    return RENEW_DOMAIN + b"".join(hashlib.sha256(x).digest() for x in (client_id.encode(), cert_pem, csr_pem))


def sign_pop(key, client_id: str, cert_pem: bytes, csr_pem: bytes) -> bytes:
    """ECDSA-SHA256 signature of :func:`pop_message` by the current certificate's private key ``key``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return key.sign(pop_message(client_id, cert_pem, csr_pem), ec.ECDSA(hashes.SHA256()))


def verify_pop(cert, client_id: str, cert_pem: bytes, csr_pem: bytes, sig: bytes) -> None:
    """SecurityError unless ``sig`` is the current certificate ``cert``'s key signing :func:`pop_message`."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    pub = cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise SecurityError("the current certificate's key is not ECDSA; refused")
    try:
        pub.verify(sig, pop_message(client_id, cert_pem, csr_pem), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise SecurityError("pop: not signed by the current certificate's key; refused") from None
