"""CLI: keygen -> issue-proxy -> client verify, rotation/revocation, exit codes 0 / 1 (invalid) / 2 (usage)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from artifacts_helpers import make_proxy
from typer.testing import CliRunner

import fedproxy_secure.cli.signing  # noqa: F401  (registers the commands)
from fedproxy_secure.cli.app import app

PP = {"FEDPROXY_KEY_PASSPHRASE": "pass-phrase-1"}
NO_PP = {"FEDPROXY_KEY_PASSPHRASE": None}


@pytest.fixture()
def run():
    runner = CliRunner()

    def _run(*args: str, env: dict | None = None):
        return runner.invoke(app, [str(a) for a in args], env=PP if env is None else env)

    return _run


def test_end_to_end_rotation_and_exit_codes(run, tmp_path: Path) -> None:
    k1 = tmp_path / "k1"
    r = run("server", "keygen", "--out", k1, "--name", "acme")
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(os.stat(k1 / "server.key").st_mode) == 0o600
    assert b"ENCRYPTED" in (k1 / "server.key").read_bytes()
    assert (k1 / "server.pub").exists()
    pinned = tmp_path / "client_keyset.json"
    pinned.write_bytes((k1 / "keyset.json").read_bytes())
    state = tmp_path / "state"

    proxy = make_proxy(tmp_path / "proxy")
    r = run("server", "issue-proxy", "--proxy", proxy, "--key", k1 / "server.key", "--version", 1, "--valid-days", 10, "--out", tmp_path / "b1")
    assert r.exit_code == 0, r.output
    r = run("client", "verify", "--bundle", tmp_path / "b1", "--keyset", pinned, "--state-dir", state)
    assert r.exit_code == 0 and "version 1" in r.output, r.output

    # wrong passphrase: usage error (2)
    r = run("server", "issue-proxy", "--proxy", proxy, "--key", k1 / "server.key", "--version", 2, "--valid-days", 10,
            "--out", tmp_path / "bx", env={"FEDPROXY_KEY_PASSPHRASE": "nope"})
    assert r.exit_code == 2, r.output

    # rotate to k2 (signed by k1), client follows the chain, then revoke k1
    k2 = tmp_path / "k2"
    r = run("server", "rotate-key", "--key", k1 / "server.key", "--keyset", k1 / "keyset.json", "--out", k2)
    assert r.exit_code == 0, r.output
    r = run("client", "update-keyset", "--pinned", pinned, "--new", k2 / "keyset.json")
    assert r.exit_code == 0 and "serial 2" in r.output, r.output
    k1_id = json.loads((k1 / "keyset.json").read_bytes())["signed_by"]
    revoked = tmp_path / "keyset3.json"
    r = run("server", "revoke-key", "--key", k2 / "server.key", "--keyset", k2 / "keyset.json", "--revoke", k1_id, "--out", revoked)
    assert r.exit_code == 0, r.output
    r = run("client", "update-keyset", "--pinned", pinned, "--new", revoked)
    assert r.exit_code == 0 and "serial 3" in r.output, r.output

    # the old bundle (k1) is now refused: invalid (1), message names the cause
    r = run("client", "verify", "--bundle", tmp_path / "b1", "--keyset", pinned, "--state-dir", state)
    assert r.exit_code == 1 and "revoked" in r.output, r.output
    # a new bundle from k2 verifies
    r = run("server", "issue-proxy", "--proxy", proxy, "--key", k2 / "server.key", "--version", 2, "--valid-days", 10, "--out", tmp_path / "b2")
    assert r.exit_code == 0, r.output
    r = run("client", "verify", "--bundle", tmp_path / "b2", "--keyset", pinned, "--state-dir", state)
    assert r.exit_code == 0, r.output
    # tampered bundle: 1
    (tmp_path / "b2" / "extra.txt").write_text("x")
    r = run("client", "verify", "--bundle", tmp_path / "b2", "--keyset", pinned, "--state-dir", state)
    assert r.exit_code == 1 and "extra file" in r.output, r.output
    # usage errors: 2
    r = run("client", "verify", "--bundle", tmp_path / "missing", "--keyset", pinned, "--state-dir", state)
    assert r.exit_code == 2, r.output
    r = run("client", "verify", "--bundle", tmp_path / "b2", "--keyset", tmp_path / "nokeyset.json", "--state-dir", state)
    assert r.exit_code == 2, r.output
    r = run("client", "verify", "--bundle", tmp_path / "b2")
    assert r.exit_code == 2
    # a chain skipping link 2 is refused (signed by k2, unknown to the serial-1 pin)
    pin2 = tmp_path / "pin2.json"
    pin2.write_bytes((k1 / "keyset.json").read_bytes())
    r = run("client", "update-keyset", "--pinned", pin2, "--new", revoked)
    assert r.exit_code == 1 and "unknown to the pinned keyset" in r.output, r.output
    assert pin2.read_bytes() == (k1 / "keyset.json").read_bytes()  # pin unchanged


def test_passphrase_file_and_unencrypted(run, tmp_path: Path) -> None:
    ppf = tmp_path / "pp.txt"
    ppf.write_text("from-file\n")
    r = run("server", "keygen", "--out", tmp_path / "k", "--passphrase-file", ppf, env=NO_PP)
    assert r.exit_code == 0, r.output
    r = run("server", "keygen", "--out", tmp_path / "k", env=NO_PP)
    assert r.exit_code == 2 and "already" in r.output
    r = run("server", "keygen", "--out", tmp_path / "plain", env=NO_PP)
    assert r.exit_code == 0 and "NOT passphrase-encrypted" in r.output
    from fedproxy_secure.artifacts import load_private_key

    load_private_key(tmp_path / "k" / "server.key", b"from-file")
    load_private_key(tmp_path / "plain" / "server.key", None)
