"""Tamper cases: every modified bundle is refused with a message naming the cause."""

from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from artifacts_helpers import NOW, Env, flip_byte, resign

from fedproxy_secure.artifacts import (
    canonical_dumps,
    generate_key,
    highest_accepted,
    issue_bundle,
    key_id,
    revoke_key,
    rotate_keyset,
    verify_bundle,
)
from fedproxy_secure.errors import ConfigError, SecurityError


@pytest.fixture()
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def refused(bundle: Path, env: Env, *words: str, keyset=None, now=NOW, state=True) -> str:
    with pytest.raises(SecurityError) as ei:
        verify_bundle(bundle, keyset or env.keyset, now=now, state_dir=env.state if state else None)
    msg = str(ei.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def test_untampered_bundle_verifies(env: Env) -> None:
    b = env.issue(version=3)
    vb = verify_bundle(b, env.keyset, now=NOW, state_dir=env.state)
    assert vb.version == 3 and vb.signer.key_id == key_id(env.key)
    assert sorted(f.path for f in vb.manifest.files) == ["config.json", "fedproxy.json", "model.safetensors", "tokenizer.json"]
    assert highest_accepted(env.state, env.keyset.name, vb.manifest.base_model_hash) == 3
    # verifying the same bundle again is fine (same version, same bundle id)
    verify_bundle(b, env.keyset, now=NOW, state_dir=env.state)


# 1-3: one flipped byte in weights, config, tokenizer
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_flipped_byte(env: Env, name: str) -> None:
    b = env.issue()
    flip_byte(b / name, offset=-2)
    refused(b, env, "SHA-256 mismatch", name, "tampered")


def test_flipped_byte_in_safetensors_header(env: Env) -> None:
    b = env.issue()
    flip_byte(b / "model.safetensors", offset=10)
    refused(b, env, "SHA-256 mismatch", "model.safetensors")


def test_truncated_file_size_mismatch(env: Env) -> None:
    b = env.issue()
    p = b / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-4])
    refused(b, env, "model.safetensors", "size")


# 4: extra file
def test_extra_file(env: Env) -> None:
    b = env.issue()
    (b / "notes.txt").write_text("hello")
    refused(b, env, "extra file", "notes.txt")


def test_extra_file_in_subfolder(env: Env) -> None:
    b = env.issue()
    (b / "sub").mkdir()
    (b / "sub" / "x.json").write_text("{}")
    refused(b, env, "extra file", "sub/x.json")


# 5: missing file
def test_missing_file(env: Env) -> None:
    b = env.issue()
    (b / "tokenizer.json").unlink()
    refused(b, env, "missing file", "tokenizer.json")


def test_missing_signature(env: Env) -> None:
    b = env.issue()
    (b / "MANIFEST.sig").unlink()
    refused(b, env, "MANIFEST.sig", "missing")


# 6: symlink
def test_symlinked_file(env: Env) -> None:
    b = env.issue()
    target = env.tmp / "outside.json"
    shutil.copy(b / "tokenizer.json", target)
    (b / "tokenizer.json").unlink()
    os.symlink(target, b / "tokenizer.json")
    refused(b, env, "symlink", "tokenizer.json")


def test_symlinked_folder(env: Env) -> None:
    b = env.issue()
    (env.tmp / "elsewhere").mkdir()
    os.symlink(env.tmp / "elsewhere", b / "linked")
    refused(b, env, "symlink", "linked")


def test_symlinked_manifest(env: Env) -> None:
    b = env.issue()
    shutil.move(b / "MANIFEST.json", env.tmp / "m.json")
    os.symlink(env.tmp / "m.json", b / "MANIFEST.json")
    refused(b, env, "symlink", "MANIFEST.json")


# 7: renamed file
def test_renamed_file(env: Env) -> None:
    b = env.issue()
    os.rename(b / "tokenizer.json", b / "tokenizer2.json")
    refused(b, env, "missing file", "tokenizer.json", "extra file", "tokenizer2.json", "renamed")


# 8: wrong key
def test_wrong_key(env: Env) -> None:
    b = env.issue(key=generate_key())
    refused(b, env, "unknown to the pinned keyset", "wrong key")


# 9: revoked key
def test_revoked_key(env: Env) -> None:
    new = generate_key()
    ks2 = rotate_keyset(env.keyset, env.key, new.public_key(), now=NOW)
    ks3 = revoke_key(ks2, new, key_id(env.key), now=NOW)
    b = env.issue()  # signed by the (now revoked) first key
    refused(b, env, "revoked", keyset=ks3)
    # a bundle from the new key verifies with the same keyset
    verify_bundle(env.issue(key=new, version=2), ks3, now=NOW, state_dir=env.state)


def test_expired_key(env: Env) -> None:
    b = env.issue()
    later = NOW + timedelta(days=400)
    # bundle validity is 30 days, so re-issue one that outlives the key to isolate the key check
    b2 = env.tmp / "long"
    issue_bundle(env.proxy, env.key, version=1, valid_days=1000, out_dir=b2, now=NOW)
    refused(b2, env, "signing key", "expired", now=later)
    assert b.exists()


# 10: expired bundle
def test_expired_bundle(env: Env) -> None:
    b = env.issue()
    refused(b, env, "bundle expired", "not_after", now=NOW + timedelta(days=31))


# 11: future not_before
def test_future_not_before(env: Env) -> None:
    b = env.issue(not_before=NOW + timedelta(days=2))
    refused(b, env, "not valid before", "future not_before")


# 12: rollback
def test_rollback(env: Env) -> None:
    v5 = env.issue(version=5)
    v4 = env.issue(version=4)
    verify_bundle(v5, env.keyset, now=NOW, state_dir=env.state)
    refused(v4, env, "lower than version 5", "rollback")


def test_same_version_other_bundle_id(env: Env) -> None:
    a, b = env.issue(version=2), env.issue(version=2)
    verify_bundle(a, env.keyset, now=NOW, state_dir=env.state)
    refused(b, env, "different bundle id")


# 13: pickle .bin in place of safetensors
def test_pickle_bin_in_place_of_safetensors(env: Env) -> None:
    b = env.issue()
    os.rename(b / "model.safetensors", b / "pytorch_model.bin")
    refused(b, env, "pickle", "pytorch_model.bin")


def test_signed_manifest_listing_pickle_is_refused(env: Env) -> None:
    b = env.issue()
    os.rename(b / "model.safetensors", b / "pytorch_model.bin")
    m = json.loads((b / "MANIFEST.json").read_bytes())
    for f in m["files"]:
        if f["path"] == "model.safetensors":
            f["path"] = "pytorch_model.bin"
    m["files"].sort(key=lambda f: f["path"])
    resign(b, env.key, canonical_dumps(m))
    refused(b, env, "pickle", "pytorch_model.bin")


def test_issue_refuses_pickle_in_proxy(env: Env) -> None:
    (env.proxy / "extra.pt").write_bytes(b"\x80\x04.")
    with pytest.raises(SecurityError, match="pickle"):
        env.issue()


def test_issue_refuses_pickle_renamed_to_safetensors(env: Env) -> None:
    (env.proxy / "model.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(SecurityError, match="not a safetensors file"):
        env.issue()


# 14: manifest edited after signing
def test_manifest_edited_after_signing(env: Env) -> None:
    b = env.issue(version=1)
    data = (b / "MANIFEST.json").read_bytes().replace(b'"version":1', b'"version":9')
    (b / "MANIFEST.json").write_bytes(data)
    refused(b, env, "does not verify", "edited after signing")


def test_corrupted_signature(env: Env) -> None:
    b = env.issue()
    flip_byte(b / "MANIFEST.sig", offset=0)
    refused(b, env, "edited after signing", "signature corrupted")


def test_signature_wrong_length(env: Env) -> None:
    b = env.issue()
    (b / "MANIFEST.sig").write_bytes(b"\x00" * 10)
    refused(b, env, "64 bytes")


def test_manifest_with_path_traversal_refused_even_if_signed(env: Env) -> None:
    b = env.issue()
    m = json.loads((b / "MANIFEST.json").read_bytes())
    m["files"][0]["path"] = "../evil.json"
    m["files"].sort(key=lambda f: f["path"])
    resign(b, env.key, canonical_dumps(m))
    refused(b, env, "'..'")


@pytest.mark.parametrize("bad", ["/etc/passwd.json", "a\\b.json"])
def test_manifest_absolute_or_backslash_refused(env: Env, bad: str) -> None:
    b = env.issue()
    m = json.loads((b / "MANIFEST.json").read_bytes())
    m["files"][0]["path"] = bad
    m["files"].sort(key=lambda f: f["path"])
    resign(b, env.key, canonical_dumps(m))
    refused(b, env, "absolute" if bad.startswith("/") else "backslash")


def test_non_canonical_manifest_refused_even_if_signed(env: Env) -> None:
    b = env.issue()
    pretty = json.dumps(json.loads((b / "MANIFEST.json").read_bytes()), indent=2).encode()
    resign(b, env.key, pretty)
    refused(b, env, "canonical")


def test_manifest_size_limit(env: Env) -> None:
    b = env.issue()
    (b / "MANIFEST.json").write_bytes(b" " * ((1 << 20) + 10))
    refused(b, env, "limit")


def test_keyset_signature_domain_separation(env: Env) -> None:
    """A keyset signature is not a manifest signature (different domain prefixes)."""
    b = env.issue()
    data = (b / "MANIFEST.json").read_bytes()
    from fedproxy_secure.artifacts.keys import KEYSET_DOMAIN, sign

    (b / "MANIFEST.sig").write_bytes(sign(env.key, KEYSET_DOMAIN, data))
    refused(b, env, "does not verify")


def test_missing_bundle_folder_is_usage_error(env: Env) -> None:
    with pytest.raises(ConfigError):
        verify_bundle(env.tmp / "nope", env.keyset, now=NOW)


def test_failed_verification_does_not_touch_rollback_state(env: Env) -> None:
    b = env.issue(version=7)
    flip_byte(b / "config.json")
    refused(b, env, "config.json")
    assert highest_accepted(env.state, env.keyset.name, json.loads((b / "MANIFEST.json").read_bytes())["base_model_hash"]) is None


def test_corrupt_rollback_state_fails_closed(env: Env) -> None:
    b = env.issue(version=1)
    verify_bundle(b, env.keyset, now=NOW, state_dir=env.state)
    for f in env.state.iterdir():
        f.write_text("garbage")
    refused(b, env, "anti-rollback state")


def test_signed_manifest_with_other_base_model_refused(env: Env) -> None:
    """fedproxy.json (hashed) must name the same base model as the signed manifest."""
    b = env.issue()
    m = json.loads((b / "MANIFEST.json").read_bytes())
    m["base_model_hash"] = "sha256:" + "cd" * 32
    resign(b, env.key, canonical_dumps(m))
    refused(b, env, "base_model_hash differs")


def test_verify_with_private_copy(env: Env, tmp_path: Path) -> None:
    b = env.issue()
    dest = tmp_path / "private"
    dest.mkdir(mode=0o700)
    vb = verify_bundle(b, env.keyset, now=NOW, copy_to=dest)
    assert vb.root == dest and vb.is_private_copy
    for f in vb.manifest.files:
        assert (dest / f.path).read_bytes() == (b / f.path).read_bytes()
