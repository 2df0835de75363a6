"""Canonical JSON, key storage, keysets: rotation chains, revocation, pin updates."""

from __future__ import annotations

import json
import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from artifacts_helpers import NOW

from fedproxy_secure.artifacts import (
    canonical_dumps,
    canonical_loads,
    create_keyset,
    generate_key,
    key_id,
    load_keyset,
    load_private_key,
    parse_keyset,
    read_passphrase,
    revoke_key,
    rotate_keyset,
    save_keyset,
    save_private_key,
    update_pin,
)
from fedproxy_secure.errors import ConfigError, SecurityError


def test_canonical_roundtrip_and_rejections() -> None:
    obj = {"b": [1, "é", None, True], "a": {"z": 0, "y": -3}}
    data = canonical_dumps(obj)
    assert data == '{"a":{"y":-3,"z":0},"b":[1,"é",null,true]}'.encode()
    assert canonical_loads(data) == obj
    with pytest.raises(SecurityError, match="float"):
        canonical_dumps({"x": 1.5})
    with pytest.raises(SecurityError, match="float"):
        canonical_loads(b'{"x":1.5}')
    with pytest.raises(SecurityError, match="NaN"):
        canonical_loads(b'{"x":NaN}')
    with pytest.raises(SecurityError, match="duplicate"):
        canonical_loads(b'{"x":1,"x":2}')
    with pytest.raises(SecurityError, match="canonical form"):
        canonical_loads(b'{"b":1,"a":2}')
    with pytest.raises(SecurityError, match="canonical form"):
        canonical_loads(b'{"a": 2}')
    with pytest.raises(SecurityError, match="limit"):
        canonical_loads(b"[" + b"1," * 100 + b"1]", max_bytes=50)


def test_key_id_is_sha256_of_raw_public_key() -> None:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    k = generate_key()
    raw = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(k) == key_id(k.public_key()) == hashlib.sha256(raw).hexdigest()


def test_private_key_file_mode_and_passphrase(tmp_path: Path) -> None:
    k = generate_key()
    p = tmp_path / "server.key"
    save_private_key(k, p, passphrase=b"correct horse")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert b"ENCRYPTED" in p.read_bytes()
    assert key_id(load_private_key(p, b"correct horse")) == key_id(k)
    with pytest.raises(ConfigError, match="passphrase"):
        load_private_key(p, None)
    with pytest.raises(ConfigError, match="wrong passphrase"):
        load_private_key(p, b"wrong")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        save_private_key(k, p)
    p2 = tmp_path / "plain.key"
    save_private_key(k, p2)
    assert key_id(load_private_key(p2)) == key_id(k)


def test_read_passphrase_sources(tmp_path: Path) -> None:
    f = tmp_path / "pp"
    f.write_text("s3cret\n")
    assert read_passphrase(f, env={}) == b"s3cret"
    assert read_passphrase(None, env={"FEDPROXY_KEY_PASSPHRASE": "x"}) == b"x"
    assert read_passphrase(None, env={}) is None


def test_keyset_roundtrip_and_tamper(tmp_path: Path) -> None:
    k = generate_key()
    ks = create_keyset(k, name="dep", now=NOW)
    save_keyset(ks, tmp_path / "keyset.json")
    back = load_keyset(tmp_path / "keyset.json")
    assert back.name == "dep" and back.serial == 1 and back.get(key_id(k)).status == "active"
    doc = json.loads((tmp_path / "keyset.json").read_bytes())
    doc["keyset"]["keys"][0]["valid_to"] = "2099-01-01T00:00:00Z"
    with pytest.raises(SecurityError, match="signature is invalid"):
        parse_keyset(canonical_dumps(doc))
    with pytest.raises(ConfigError):
        load_keyset(tmp_path / "missing.json")


def test_rotation_chain_and_pin_update() -> None:
    k1, k2, k3 = generate_key(), generate_key(), generate_key()
    ks1 = create_keyset(k1, name="dep", now=NOW)
    ks2 = rotate_keyset(ks1, k1, k2.public_key(), now=NOW + timedelta(days=1))
    assert ks2.signed_by == key_id(k1) and ks2.serial == 2
    ks3 = rotate_keyset(ks2, k2, k3.public_key(), now=NOW + timedelta(days=2))
    ks4 = revoke_key(ks3, k3, key_id(k1), now=NOW + timedelta(days=3))
    for ks in (ks2, ks3, ks4):  # every keyset re-parses from its bytes
        assert parse_keyset(ks.to_bytes()).serial == ks.serial
    pinned = update_pin(ks1, [ks2, ks3, ks4], now=NOW + timedelta(days=3))
    assert pinned.serial == 4 and pinned.get(key_id(k1)).status == "revoked"
    # skipping a link: ks3 is signed by k2, which ks1 does not know
    with pytest.raises(SecurityError, match="unknown to the pinned keyset"):
        update_pin(ks1, [ks3], now=NOW + timedelta(days=3))


def test_pin_update_refusals() -> None:
    k1, k2, evil = generate_key(), generate_key(), generate_key()
    ks1 = create_keyset(k1, name="dep", now=NOW)
    ks2 = rotate_keyset(ks1, k1, k2.public_key(), now=NOW)
    ks3 = revoke_key(ks2, k2, key_id(k1), now=NOW)
    # rollback to an older serial
    with pytest.raises(SecurityError, match="rollback"):
        update_pin(ks2, [ks1], now=NOW)
    # a different deployment's keyset
    other = create_keyset(evil, name="other", now=NOW)
    with pytest.raises(SecurityError, match="differs from pinned"):
        update_pin(ks1, [other], now=NOW)
    # an attacker's self-signed keyset with the same name and a higher serial
    fake = rotate_keyset(create_keyset(evil, name="dep", now=NOW), evil, generate_key().public_key(), now=NOW)
    with pytest.raises(SecurityError, match="unknown to the pinned keyset"):
        update_pin(ks1, [fake], now=NOW)
    # the revoked key k1 signs a newer keyset (after revocation): refused
    from dataclasses import replace

    from fedproxy_secure.artifacts.keyset import _signed

    k1_again = _signed("dep", 4, NOW, [replace(e, status="active") for e in ks3.keys], k1)
    with pytest.raises(SecurityError, match="revoked key"):
        update_pin(ks3, [k1_again], now=NOW)
    # k2 un-revoking k1 is refused (revocation is sticky)
    unrevoke = _signed("dep", 4, NOW, [replace(e, status="active") for e in ks3.keys], k2)
    with pytest.raises(SecurityError, match="un-revokes"):
        update_pin(ks3, [unrevoke], now=NOW)
    # an expired signing key cannot move the pin
    with pytest.raises(SecurityError, match="expired key"):
        update_pin(ks1, [ks2], now=NOW + timedelta(days=400))


def test_revoke_rules() -> None:
    k1, k2 = generate_key(), generate_key()
    ks1 = create_keyset(k1, name="dep", now=NOW)
    with pytest.raises(ConfigError, match="own revocation"):
        revoke_key(ks1, k1, key_id(k1), now=NOW)
    ks2 = rotate_keyset(ks1, k1, k2.public_key(), now=NOW)
    ks3 = revoke_key(ks2, k2, key_id(k1), now=NOW)
    with pytest.raises(ConfigError, match="revoked"):
        rotate_keyset(ks3, k1, generate_key().public_key(), now=NOW)
