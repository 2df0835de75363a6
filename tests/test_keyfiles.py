"""Private keys at rest: 0600 exclusive creation, loads refuse readable files, the operator key encrypted."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedproxy_secure.artifacts.keyfiles import (OPERATOR_PASSPHRASE_ENV, load_pem_private_key_file, new_secret_file,
                                                read_secret_file, write_private_file)
from fedproxy_secure.artifacts.keys import (generate_key, key_id, load_operator_key, load_private_key, load_public_key,
                                            save_operator_key, save_private_key)
from fedproxy_secure.errors import ConfigError, SecurityError

PP = "correct horse battery staple"


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0)  # the most permissive umask: the files must still come out 0600
    yield
    os.umask(old)


def test_private_files_are_created_0600_even_with_umask_0(tmp_path, open_umask):
    write_private_file(tmp_path / "a" / "secret", b"x")
    save_private_key(generate_key(), tmp_path / "id.key")
    new_secret_file(tmp_path / "audit.secret")
    for p in ("a/secret", "id.key", "audit.secret"):
        assert mode(tmp_path / p) == 0o600, p


def test_write_refuses_existing_file_and_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"victim")
    (tmp_path / "link.key").symlink_to(target)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_private_file(tmp_path / "link.key", b"key")
    assert target.read_bytes() == b"victim"
    write_private_file(tmp_path / "k", b"one")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_private_file(tmp_path / "k", b"two")
    write_private_file(tmp_path / "k", b"two", replace=True)  # explicit replace: fresh 0600 file, renamed
    assert (tmp_path / "k").read_bytes() == b"two" and mode(tmp_path / "k") == 0o600


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o660, 0o644])
def test_every_loader_refuses_a_group_or_world_readable_key(tmp_path, bad_mode):
    from fedproxy_secure.transport.pki import create_ca, issue_client_cert, load_key
    from fedproxy_secure.transport.tls import client_ssl_context

    k = tmp_path / "identity.key"
    save_private_key(generate_key(), k)
    ca = create_ca(tmp_path / "pki")
    pair = issue_client_cert(ca, "site0", tmp_path / "site")
    for p in (k, ca.key, pair.key):
        os.chmod(p, bad_mode)
    with pytest.raises(SecurityError, match=f"run: chmod 600 {k}"):
        load_private_key(k)
    with pytest.raises(SecurityError, match=f"chmod 600 {ca.key}"):
        load_key(ca.key)
    with pytest.raises(SecurityError, match=f"chmod 600 {pair.key}"):
        client_ssl_context(ca.cert, pair.cert, pair.key)
    os.chmod(k, 0o600)
    load_private_key(k)  # the fix the message names works


def test_client_session_refuses_a_readable_identity_key(tmp_path):
    from fedproxy_secure.client.join import ClientSession
    from fedproxy_secure.server.rounds import FederationSettings
    from fedproxy_secure.server.setup import enroll_site, init_server

    d = tmp_path / "srv"
    init_server(d, FederationSettings.from_dict({"rounds": 1, "min_clients": 3, "threshold": 2, "dim": 4}))
    e = enroll_site(d, "site0", "https://127.0.0.1:1")
    state = tmp_path / "state"
    ClientSession(e, state, retry_s=1).close()  # creates identity.key 0600
    assert mode(state / "identity.key") == 0o600
    os.chmod(state / "identity.key", 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        ClientSession(e, state, retry_s=1)
    os.chmod(state / "identity.key", 0o600)
    os.chmod(e / "client.key", 0o644)
    with pytest.raises(SecurityError, match=f"chmod 600 {e / 'client.key'}"):
        ClientSession(e, state, retry_s=1)
    os.chmod(e / "client.key", 0o600)
    os.chmod(e / "token", 0o644)
    s = ClientSession(e, state, retry_s=1)
    try:
        with pytest.raises(SecurityError, match=f"chmod 600 {e / 'token'}"):
            s.enroll()  # the one-time token is read only from a 0600 file, before anything is sent
    finally:
        s.close()


def test_every_private_file_of_a_server_folder_is_0600(tmp_path, open_umask):
    from fedproxy_secure.server.rounds import FederationSettings
    from fedproxy_secure.server.setup import enroll_site, he_statement_key, init_server

    d = tmp_path / "srv"
    init_server(d, FederationSettings.from_dict({"rounds": 1, "min_clients": 3, "threshold": 2, "dim": 4}))
    enroll_site(d, "site0", "https://127.0.0.1:1")
    he_statement_key(d)
    secrets_found = [p for p in d.rglob("*") if p.is_file() and (p.suffix in (".key", ".secret") or p.name == "token")]
    names = sorted(p.relative_to(d).as_posix() for p in secrets_found)
    assert {"pki/ca.key", "pki/server.key", "keys/operator.key", "keys/he_statement.key",
            "enrol/site0/client.key", "enrol/site0/token"} <= set(names), names
    for p in secrets_found:
        assert mode(p) == 0o600, p


def test_operator_key_encrypted_with_the_env_passphrase(tmp_path, monkeypatch):
    from fedproxy_secure.server.rounds import FederationSettings
    from fedproxy_secure.server.runner import build_context
    from fedproxy_secure.server.setup import init_server

    monkeypatch.setenv(OPERATOR_PASSPHRASE_ENV, PP)
    d = tmp_path / "srv"
    init_server(d, FederationSettings.from_dict({"rounds": 1, "min_clients": 3, "threshold": 2, "dim": 4}))
    pem = (d / "keys" / "operator.key").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") and mode(d / "keys" / "operator.key") == 0o600
    key = load_operator_key(d / "keys" / "operator.key")
    assert key_id(key) == key_id(load_public_key(d / "keys" / "operator.pub"))
    ctx = build_context(d)  # the server process decrypts it from the environment
    ctx.store.close()
    monkeypatch.delenv(OPERATOR_PASSPHRASE_ENV)
    with pytest.raises(ConfigError, match=f"passphrase-protected: set {OPERATOR_PASSPHRASE_ENV}"):
        build_context(d)
    monkeypatch.setenv(OPERATOR_PASSPHRASE_ENV, "not the passphrase at all")
    with pytest.raises(ConfigError, match="wrong passphrase"):
        load_operator_key(d / "keys" / "operator.key")


def test_operator_passphrase_rules(tmp_path):
    with pytest.raises(ConfigError, match="at least 12"):
        save_operator_key(generate_key(), tmp_path / "op.key", env={OPERATOR_PASSPHRASE_ENV: "short"})
    assert not (tmp_path / "op.key").exists()
    assert save_operator_key(generate_key(), tmp_path / "plain.key", env={}) is False  # development: unencrypted
    assert b"ENCRYPTED" not in (tmp_path / "plain.key").read_bytes()
    load_operator_key(tmp_path / "plain.key", env={OPERATOR_PASSPHRASE_ENV: PP})  # an unencrypted key still loads
    assert save_operator_key(generate_key(), tmp_path / "enc.key", env={OPERATOR_PASSPHRASE_ENV: PP}) is True
    with pytest.raises(ConfigError, match="passphrase-protected"):
        load_pem_private_key_file(tmp_path / "enc.key")


def test_secret_file_length_is_checked(tmp_path):
    s = new_secret_file(tmp_path / "audit.secret")
    assert read_secret_file(tmp_path / "audit.secret") == s and len(s) == 32
    with open(tmp_path / "audit.secret", "ab") as fh:
        fh.write(b"!")
    with pytest.raises(SecurityError, match="33 bytes"):
        read_secret_file(tmp_path / "audit.secret")
