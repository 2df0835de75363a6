"""The signed proxy bundle as bytes in a Flower message, and the client's verification of it.

No ``flwr`` import here. The server reads an issued bundle folder into ``{name: bytes}``
(:func:`bundle_blobs`); Flower carries that map in a ``ConfigRecord`` (bytes values, serialised by
Flower's protobuf messages -- no pickle). The client (:func:`receive_bundle`) checks it exactly as
``client join`` checks a bundle it downloads (:mod:`fedproxy_secure.client.net_lora`):

1. ``MANIFEST.sig`` (exactly 64 bytes) must verify over ``MANIFEST.json`` under a key of the
   site's *pinned* keyset before the manifest is parsed;
2. only files the signed manifest lists are written, each through
   :func:`fedproxy_secure.artifacts.manifest.check_path`, each refused when larger than its
   stated size; any other name in the message is refused;
3. :func:`fedproxy_secure.artifacts.load_verified_proxy` re-runs the full verification (key status
   and validity, expiry, anti-rollback state, exact file set, sizes and SHA-256) and loads only a
   private copy of the verified bytes (safetensors, no remote code).

A bundle that fails any step raises SecurityError and its folder is removed: nothing is trained.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

from fedproxy_secure.errors import ConfigError, SecurityError

FILE_PREFIX = "file:"


def init_operator(folder: str | os.PathLike, *, valid_days: int = 365) -> tuple[Path, Path]:
    """Create an operator signing key (0600) and its self-signed keyset in ``folder``.

    Returns ``(operator.key, keyset.json)``. The keyset is what every site pins; the key stays with
    the ServerApp. Refuses to overwrite an existing key (ConfigError from the SDK writer).
    """
    from fedproxy_secure.artifacts.keys import generate_key, save_operator_key
    from fedproxy_secure.artifacts.keyset import create_keyset, save_keyset

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    key_path, ks_path = folder / "operator.key", folder / "keyset.json"
    save_operator_key(key, key_path)
    save_keyset(create_keyset(key, valid_days=valid_days), ks_path)
    return key_path, ks_path


def issue_proxy_bundle(proxy, tokenizer, base_model_hash: str, operator_key: str | os.PathLike, work: str | os.PathLike,
                       *, version: int, valid_days: int) -> Path:
    """Write the proxy (HF folder + fedproxy.json) under ``work`` and sign it as a bundle; return the bundle folder.

    Uses the SDK's :func:`save_proxy` and :func:`issue_bundle` (the same writer as ``server setup``).
    """
    from fedproxy_secure.artifacts import issue_bundle
    from fedproxy_secure.artifacts.keys import load_operator_key
    from fedproxy_secure.compress.proxy_io import save_proxy

    work = Path(work)
    proxy_dir = save_proxy(proxy, tokenizer, work / "proxy", base_model_hash=base_model_hash)
    issue_bundle(proxy_dir, load_operator_key(operator_key), version=version, valid_days=valid_days,
                 out_dir=work / "bundle")
    return work / "bundle"


def bundle_blobs(bundle_dir: str | os.PathLike) -> dict[str, bytes]:
    """``{"MANIFEST.sig", "MANIFEST.json", "file:<path>"...}`` -> bytes for every file of an issued bundle."""
    from fedproxy_secure.artifacts.manifest import MANIFEST_NAME, SIGNATURE_NAME, parse_manifest

    root = Path(bundle_dir)
    data = (root / MANIFEST_NAME).read_bytes()
    out = {SIGNATURE_NAME: (root / SIGNATURE_NAME).read_bytes(), MANIFEST_NAME: data}
    for f in parse_manifest(data).files:
        out[FILE_PREFIX + f.path] = (root / f.path).read_bytes()
    return out


def _write_signed_files(blobs: Mapping[str, bytes], keyset, dest: Path) -> None:
    """Steps 1-2 of the module docstring into the new private folder ``dest``."""
    from fedproxy_secure.artifacts.keys import MANIFEST_DOMAIN, verify_signature
    from fedproxy_secure.artifacts.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, SIGNATURE_NAME, check_path,
                                                    parse_manifest)

    sig, data = blobs.get(SIGNATURE_NAME), blobs.get(MANIFEST_NAME)
    if not isinstance(sig, bytes) or not isinstance(data, bytes):
        raise SecurityError("proxy bundle message lacks MANIFEST.sig or MANIFEST.json; refused")
    if len(sig) != 64:
        raise SecurityError(f"proxy bundle: MANIFEST.sig must be exactly 64 bytes, has {len(sig)}; refused")
    if len(data) > MAX_MANIFEST_BYTES:
        raise SecurityError("proxy bundle: MANIFEST.json is larger than the 1 MiB limit; refused")
    if not any(verify_signature(k.public_key, sig, MANIFEST_DOMAIN, data) for k in keyset.keys):
        raise SecurityError("proxy bundle: MANIFEST.sig does not verify under any key of the pinned keyset; refused")
    manifest = parse_manifest(data)
    listed = {FILE_PREFIX + f.path for f in manifest.files}
    extra = sorted(set(blobs) - listed - {SIGNATURE_NAME, MANIFEST_NAME})
    if extra:
        raise SecurityError(f"proxy bundle message carries files the signed manifest does not list: {extra[:3]}; refused")
    dest.mkdir(parents=True, exist_ok=False)
    os.chmod(dest, 0o700)
    (dest / SIGNATURE_NAME).write_bytes(sig)
    (dest / MANIFEST_NAME).write_bytes(data)
    for f in manifest.files:
        rel = check_path(f.path)
        body = blobs.get(FILE_PREFIX + f.path)
        if not isinstance(body, bytes):
            raise SecurityError(f"proxy bundle message lacks the signed file {f.path}; refused")
        if len(body) > f.size:
            raise SecurityError(f"proxy bundle file {f.path}: larger than the {f.size} bytes the signed manifest states")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as fh:
            fh.write(body)


def receive_bundle(blobs: Mapping[str, bytes], keyset_path: str | os.PathLike, state_dir: str | os.PathLike):
    """Verify a bundle received in a Flower message and load it: ``(model, tokenizer, VerifiedBundle)``.

    Guarantees (module docstring): nothing is parsed before the signature verifies under the pinned
    keyset; the model is loaded only from verified bytes; anti-rollback state lives in
    ``state_dir/bundle-state`` (a later, lower version is refused). The verified bundle is kept in
    ``state_dir/bundle`` so a restarted ClientApp process can re-verify and reload it
    (:func:`reload_bundle`). Raises SecurityError (refused) or ConfigError (no keyset).
    """
    from fedproxy_secure.artifacts import load_keyset

    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    keyset = load_keyset(keyset_path)
    dest = state_dir / "bundle"
    if dest.exists():
        shutil.rmtree(dest)
    try:
        _write_signed_files(blobs, keyset, dest)
        return reload_bundle(keyset_path, state_dir, keyset=keyset)
    except Exception:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def reload_bundle(keyset_path: str | os.PathLike, state_dir: str | os.PathLike, *, keyset=None):
    """Re-verify ``state_dir/bundle`` in full and load it (same guarantees as :func:`receive_bundle`)."""
    from fedproxy_secure.artifacts import load_keyset, load_verified_proxy

    state_dir = Path(state_dir)
    if not (state_dir / "bundle").is_dir():
        raise ConfigError(f"no verified proxy bundle in {state_dir}; the server must send one (join) first")
    ks = keyset if keyset is not None else load_keyset(keyset_path)
    loaded = load_verified_proxy(state_dir / "bundle", ks, state_dir / "bundle-state")
    model, tok = loaded
    if tok is None:
        raise SecurityError("proxy bundle has no tokenizer files; the operator must issue the proxy with its tokenizer")
    return model, tok, loaded.bundle
