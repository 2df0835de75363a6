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
