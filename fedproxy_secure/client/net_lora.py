"""The real trainer of a networked client: fetch the signed proxy bundle over the API, verify it
against the pinned keyset *before* loading anything, attach LoRA with the federation's A seed, and
train each round with :func:`fedproxy_secure.client.trainer.train_round` (DP-SGD when on).

Order of checks for the bundle (nothing from the server is parsed before its signature verifies):
1. ``MANIFEST.sig`` and ``MANIFEST.json`` are fetched; the signature must verify under a key of the
   pinned keyset before the manifest is parsed;
2. each file the signed manifest lists is streamed into a fresh private folder, refused if it grows
   past the manifest's size, its path must be a safe relative path;
3. :func:`fedproxy_secure.artifacts.load_verified_proxy` then re-runs the full verification (key
   status and validity, expiry, anti-rollback in the state folder, exact file set, sizes and
   SHA-256) and loads only the verified private copy (safetensors, no remote code).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from fedproxy_secure.errors import ConfigError, SecurityError

Log = Callable[[str], None]


def _signed_stream(session, path: str, dest: Path, max_bytes: int) -> int:
    """GET ``path`` (signed, mTLS) into ``dest``, refusing more than ``max_bytes``; returns bytes written.

    Goes through the transport's retry wrapper (:func:`retry_transport`): a server that is down
    or restarting is retried with a freshly signed request and the download starts over; after the
    retry window it ends as one ``ServerUnreachable`` line naming the server URL.
    """
    from fedproxy_secure.transport.http import retry_transport
    from fedproxy_secure.transport.signing import sign_request

    http = session.http

    def attempt() -> int:
        headers = sign_request(session.key, session.client_id, "GET", path, b"")  # fresh nonce per attempt
        n, created = 0, False
        try:
            with http.http.stream("GET", http.base + path, headers=headers) as r:
                if r.status_code != 200:
                    r.read()
                    raise SecurityError(f"bundle file {path}: server answered {r.status_code}: {r.content[:200]!r}")
                with open(dest, "xb") as fh:
                    created = True
                    for chunk in r.iter_bytes(1 << 20):
                        n += len(chunk)
                        if n > max_bytes:
                            raise SecurityError(f"bundle file {path}: larger than the {max_bytes} bytes the signed "
                                                "manifest states")
                        fh.write(chunk)
        except Exception:
            if created:
                dest.unlink(missing_ok=True)  # never leave a partial file (a retry starts over)
            raise
        return n

    return retry_transport(attempt, http.base, getattr(http, "retry_s", 120.0), f"proxy bundle download {path}")


def fetch_bundle(session, keyset, dest: str | os.PathLike) -> Path:
    """Download the server's proxy bundle into the new folder ``dest`` (steps 1-2 of the module doc).

    Guarantees: the manifest is parsed only after its signature verified under a pinned key; only
    files the signed manifest lists are fetched, each at most its stated size. The caller must
    still run :func:`load_verified_proxy` on ``dest`` (hashes, validity, rollback) before use.
    """
    from fedproxy_secure.artifacts.keys import MANIFEST_DOMAIN, verify_signature
    from fedproxy_secure.artifacts.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, SIGNATURE_NAME, check_path,
                                                    parse_manifest)

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=False)
    os.chmod(dest, 0o700)
    _signed_stream(session, f"/v1/bundle/{SIGNATURE_NAME}", dest / SIGNATURE_NAME, 64)
    _signed_stream(session, f"/v1/bundle/{MANIFEST_NAME}", dest / MANIFEST_NAME, MAX_MANIFEST_BYTES)
    sig, data = (dest / SIGNATURE_NAME).read_bytes(), (dest / MANIFEST_NAME).read_bytes()
    if not any(verify_signature(k.public_key, sig, MANIFEST_DOMAIN, data) for k in keyset.keys):
        raise SecurityError("proxy bundle: MANIFEST.sig does not verify under any key of the pinned keyset; refused")
    manifest = parse_manifest(data)
    for f in manifest.files:
        rel = check_path(f.path)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _signed_stream(session, f"/v1/bundle/{rel}", target, f.size)
    return dest


def load_bundle_from_server(session, keyset_path: str | os.PathLike, state_dir: str | os.PathLike,
                            log: Log | None = None):
    """Fetch, verify and load the proxy: ``(model, tokenizer, VerifiedBundle)``.

    The download folder is private to this client and deleted after loading; the anti-rollback
    state lives in ``state_dir/bundle-state``, so a restarted client accepts the same version again
    but never an older one.
    """
    from fedproxy_secure.artifacts import load_keyset, load_verified_proxy

    keyset = load_keyset(keyset_path)
    tmp = Path(tempfile.mkdtemp(prefix="bundle-dl-", dir=state_dir))
    try:
        src = fetch_bundle(session, keyset, tmp / "bundle")
        loaded = load_verified_proxy(src, keyset, Path(state_dir) / "bundle-state")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model, tok = loaded
    if tok is None:
        raise SecurityError("proxy bundle has no tokenizer files; the operator must issue the proxy with its tokenizer")
    (log or (lambda _m: None))(f"proxy bundle {loaded.bundle.bundle_id[:12]} v{loaded.bundle.version} verified "
                               f"(key {loaded.bundle.signer.key_id[:12]}) and loaded")
    return model, tok, loaded.bundle


def check_dp_policy(own, policy: dict | None) -> None:
    """Refuse to train when the operator's signed DP policy (round config ``train.dp``) is stricter
    than the site's own DP settings: DP required but off here, or a larger ε or δ here."""
    if not policy or not policy.get("enabled"):
        return
    if not own.enabled:
        raise ConfigError("the federation requires DP (round config train.dp.enabled) but this client's dp.enabled is "
                          "false; set dp.enabled: true in client.yaml")
    if own.epsilon > float(policy.get("epsilon", own.epsilon)) + 1e-12:
        raise ConfigError(f"client dp.epsilon = {own.epsilon} exceeds the federation's ε = {policy['epsilon']}; lower it")
    if own.delta > float(policy.get("delta", own.delta)) + 1e-18:
        raise ConfigError(f"client dp.delta = {own.delta} exceeds the federation's δ = {policy['delta']}; lower it")


def lora_train_fn(model, tokenizer, examples, cfg, state_dir: str | os.PathLike, log: Log | None = None):
    """``train_fn(theta, round_config)`` for :func:`join_federation` with real LoRA training.

    On the first round it attaches LoRA to ``model`` with the signed config's ``a_seed`` and
    ``train.lora``; later rounds must carry the same A seed (FFA-LoRA keeps A fixed), else
    ModelError. DP uses the site's own ``cfg.dp`` and its on-disk budget (charged before training).
    """
    from fedproxy_secure.client.round_fn import make_round_train_fn
    from fedproxy_secure.config import LoraConfig
    from fedproxy_secure.lora import attach_lora
    from fedproxy_secure.privacy.budget import PrivacyBudget

    state = {"fn": None}
    budget = PrivacyBudget(Path(state_dir) / cfg.budget_file, cfg.dp.epsilon, cfg.dp.delta) if cfg.dp.enabled else None

    def train_fn(theta: np.ndarray, rc: dict) -> tuple[np.ndarray, dict]:
        tr = dict(rc.get("train") or {})
        check_dp_policy(cfg.dp, tr.get("dp"))
        if state["fn"] is None:
            lcfg = LoraConfig.model_validate(tr.get("lora") or {})
            pm = attach_lora(model, lcfg, int(rc["a_seed"]))
            state["fn"] = make_round_train_fn(pm, tokenizer, examples, a_seed=int(rc["a_seed"]),
                                              dp=cfg.dp if cfg.dp.enabled else None, budget=budget,
                                              planned_rounds=int(rc.get("total_rounds") or 1), device=cfg.device)
        update, report = state["fn"](theta, rc)
        if log:
            eps = report.get("epsilon")
            log(f"round {rc['round_id']}: trained {report.get('steps')} steps, loss {report.get('train_loss'):.4f}, "
                f"|update| {report.get('post_clip_norm'):.4f}" + (f", ε {eps:.3f}" if eps is not None else ""))
        return update, report

    return train_fn
