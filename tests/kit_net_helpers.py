"""Helpers for CSR-enrolment network tests: a server folder whose sites get kits (no private key inside)."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.net_helpers import free_port, masking_settings


def free_port_pair() -> int:
    """A port p with p and p + 1 both free (the federation port and the CSR enrolment listener)."""
    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no free port pair")


def make_kit_server(tmp: Path, n_sites: int, **settings) -> tuple[Path, int, list[Path]]:
    """``(server dir, port, site dirs)``: a masking federation and one unpacked kit per site (``site{i}``)."""
    from fedproxy_secure.artifacts.keys import generate_key
    from fedproxy_secure.artifacts.keyset import create_keyset, save_keyset
    from fedproxy_secure.client.kit import unpack_kit
    from fedproxy_secure.protocol.settings import FederationSettings
    from fedproxy_secure.server.kit import write_site_kit
    from fedproxy_secure.server.setup import init_server, server_paths

    port = free_port_pair()
    d = tmp / "srv"
    init_server(d, FederationSettings.from_dict(masking_settings(**({"rounds": 1} | settings))))
    save_keyset(create_keyset(generate_key()), server_paths(d)["keyset"])
    data = tmp / "data.jsonl"
    data.write_text('{"prompt": "Q", "response": "A"}\n')
    sites = []
    for i in range(n_sites):
        kit = tmp / f"site{i}.zip"
        write_site_kit(d, f"site{i}", kit, url=f"https://127.0.0.1:{port}")
        unpack_kit(kit, tmp / f"site{i}", data)
        sites.append(tmp / f"site{i}")
    return d, port, sites


def private_key_files(root: Path) -> list[Path]:
    """Every file under ``root`` holding a PEM private key."""
    return [p for p in root.rglob("*") if p.is_file() and b"PRIVATE KEY-----" in p.read_bytes()]


def public_keys_of_private_files(root: Path) -> set[bytes]:
    """The public keys (DER SubjectPublicKeyInfo) of every PEM private key under ``root``."""
    from cryptography.hazmat.primitives import serialization

    out = set()
    for p in private_key_files(root):
        try:
            k = serialization.load_pem_private_key(p.read_bytes(), None)
        except (TypeError, ValueError):  # an encrypted key: it cannot be a site's key either, but report it
            out.add(b"encrypted:" + str(p).encode())
            continue
        out.add(k.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    return out
