"""A tiny private PKI for mutual TLS: a CA, a server certificate and client certificates.

Keys are ECDSA P-256 (``cryptography``); private keys are written with mode 0600 and never
overwritten silently. The CA signs a server certificate valid for the given DNS names / IPs and
client certificates carrying only the ``clientAuth`` extended key usage.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedproxy_secure.errors import ConfigError


@dataclass(frozen=True)
class CertPair:
    """Paths of a PEM certificate and its PEM private key."""

    cert: Path
    key: Path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as a fresh 0600 file (exclusive create, then an atomic rename over
    any old one; :func:`fedproxy_secure.artifacts.keyfiles.write_private_file`)."""
    from fedproxy_secure.artifacts.keyfiles import write_private_file

    write_private_file(path, data, replace=True)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_cert(path: str | os.PathLike) -> x509.Certificate:
    """Load a PEM certificate."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def load_key(path: str | os.PathLike):
    """Load a PEM private key; refuses a key file accessible by group/others (names ``chmod 600 FILE``)."""
    from fedproxy_secure.artifacts.keyfiles import load_pem_private_key_file

    return load_pem_private_key_file(path)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def create_ca(out_dir: str | os.PathLike, name: str = "fedproxy-secure CA", days: int = 3650) -> CertPair:
    """Create a self-signed CA (``ca.pem``, ``ca.key``) in ``out_dir``; refuses to overwrite one."""
    out = Path(out_dir)
    pair = CertPair(out / "ca.pem", out / "ca.key")
    if pair.key.exists():
        raise ConfigError(f"{pair.key} already exists; refusing to overwrite an existing CA")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    write_private(pair.key, _key_pem(key))
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pair


def _issue(ca: CertPair, common_name: str, out_cert: Path, out_key: Path, *, server: bool,
           hosts: tuple[str, ...] = (), days: int = 825) -> CertPair:
    ca_cert = load_cert(ca.cert)
    ca_key = load_key(ca.key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        names: list[x509.GeneralName] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    write_private(out_key, _key_pem(key))
    out_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertPair(out_cert, out_key)


def issue_server_cert(ca: CertPair, out_dir: str | os.PathLike,
                      hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> CertPair:
    """Issue ``server.pem``/``server.key`` for ``hosts`` (IP addresses or DNS names)."""
    out = Path(out_dir)
    return _issue(ca, hosts[0] if hosts else "fedproxy-server", out / "server.pem", out / "server.key",
                  server=True, hosts=tuple(hosts))


def issue_client_cert(ca: CertPair, name: str, out_dir: str | os.PathLike) -> CertPair:
    """Issue ``client.pem``/``client.key`` (CN = ``name``, clientAuth only) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _issue(ca, name, out / "client.pem", out / "client.key", server=False)


# --------------------------------------------------------------------------- CSR enrolment
#: default lifetime of a client certificate signed from a CSR (short: a revoked or lost site ages out)
CLIENT_CERT_DAYS = 30
MAX_CSR_BYTES = 8 << 10


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key for a site's TLS client certificate (made at the site, never sent)."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM (write it only with :func:`write_private`, mode 0600)."""
    return _key_pem(key)


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    """A PEM certificate signing request for site ``name`` (CN and DNS SAN = ``name``), signed by ``key``."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def check_csr(pem: bytes, name: str) -> x509.CertificateSigningRequest:
    """The parsed CSR if it is acceptable for site ``name``; SecurityError naming the reason otherwise.

    Guarantees on success: at most :data:`MAX_CSR_BYTES`, PEM, its self-signature verifies (proof that the
    requester holds the private key), the key is ECDSA P-256, the subject is exactly ``CN=name`` and a SAN,
    if present, names only ``name``. Nothing else of the CSR is copied into the certificate.
    """
    from fedproxy_secure.errors import SecurityError

    if len(pem) > MAX_CSR_BYTES:
        raise SecurityError(f"CSR is larger than {MAX_CSR_BYTES} bytes; refused")
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise SecurityError(f"CSR is not a PEM certificate signing request ({exc})") from None
    if not csr.is_signature_valid:
        raise SecurityError("CSR signature does not verify (no proof of possession of its key); refused")
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP256R1):
        raise SecurityError("CSR key must be ECDSA P-256; refused")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(csr.subject) != 1 or len(cns) != 1 or cns[0].value != name:
        raise SecurityError(f"CSR subject is {csr.subject.rfc4514_string()!r}, the token is for site {name!r}; refused")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None and list(san) != [x509.DNSName(name)]:
        raise SecurityError(f"CSR subjectAltName must name only {name!r}; refused")
    return csr


def sign_csr(ca: CertPair, csr: x509.CertificateSigningRequest, name: str,
             days: int = CLIENT_CERT_DAYS) -> x509.Certificate:
    """A client certificate for ``name`` over the CSR's public key, signed by the CA (loads ``ca.key`` now).

    Only the key is taken from the CSR (check it first with :func:`check_csr`); the certificate carries
    CN/SAN = ``name``, ``clientAuth`` only, a random serial and ``days`` of validity.
    """
    if not ca.key.is_file():
        raise ConfigError(f"{ca.key} is not here (the CA key is kept offline): bring it back to sign a site's "
                          "certificate, or enrol later")
    ca_cert, ca_key = load_cert(ca.cert), load_key(ca.key)
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def check_issued(cert_pem: bytes, ca_pem: bytes, key: ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
    """The certificate the server returned, if it is ours: signed by the kit's CA, over our key, for ``name``,
    client-auth, currently valid. SecurityError otherwise (a site never installs anything else)."""
    from fedproxy_secure.errors import SecurityError

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))  # issuer name and signature
    except Exception as exc:  # noqa: BLE001 (any parse or signature failure is a refusal)
        raise SecurityError(f"the server's certificate does not verify against the kit's CA ({exc!r})") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise SecurityError("the server's certificate is not for this site's key; refused")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns or cns[0].value != name:
        raise SecurityError(f"the server's certificate names {cert.subject.rfc4514_string()!r}, not {name!r}; refused")
    now = _now()
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise SecurityError("the server's certificate is not currently valid; refused")
    return cert


def write_crl(ca: CertPair, revoked: list[tuple[int, _dt.datetime]], out: str | os.PathLike,
              days: int = 3650) -> Path:
    """Sign a CRL listing ``(serial, revoked_at)`` with the CA key and write it to ``out`` (PEM, atomic).

    ``next_update`` is ``days`` ahead: the server refuses every handshake if the CRL it loads has expired,
    and the CA key may be offline between revocations.
    """
    ca_cert, ca_key = load_cert(ca.cert), load_key(ca.key)
    now = _now()
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
         .last_update(now - _dt.timedelta(minutes=5)).next_update(now + _dt.timedelta(days=days)))
    for serial, when in revoked:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(when).build())
    crl = b.sign(ca_key, hashes.SHA256())
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, out)
    return out
