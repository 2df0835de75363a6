"""Shared builders for the serve-model tests: a signed tiny logit fused folder, a server folder, site
certificates (enrolled or not), and the flooding client of the load test."""

from __future__ import annotations

import copy
import json
import os
import ssl
import threading
import time
from pathlib import Path

import torch

from fedproxy_secure.config import TinyModelSpec

SPEC = TinyModelSpec(layers=4, hidden=32, heads=4, intermediate=64, vocab=300, seed=7)
KEEP = [0, 2, 3]


def fused_folder(tmp: Path, key, spec: TinyModelSpec = SPEC, keep: list[int] = KEEP) -> Path:
    """A signed logit fused folder (tiny LLM, a proxy of its ``keep`` blocks, a random LoRA, β 0.8, round 2)."""
    from peft import LoraConfig, get_peft_model

    from fedproxy_secure.fuse import write_logit_folder
    from fedproxy_secure.models import load_causal_lm, set_decoder_blocks
    from fedproxy_secure.models.tiny import save_tiny_llm

    llm_dir = save_tiny_llm(spec, tmp / "llm")
    proxy = copy.deepcopy(load_causal_lm(llm_dir))
    set_decoder_blocks(proxy, keep)
    proxy.save_pretrained(tmp / "proxy", safe_serialization=True)
    (tmp / "proxy" / "fedproxy.json").write_text(json.dumps({"layer_map": keep, "fusion_mode": "overwrite",
                                                            "distilled": False, "base_model_hash": "h" * 64}))
    torch.manual_seed(0)
    pm = get_peft_model(proxy, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp / "adapter", safe_serialization=True)
    out = tmp / "fused"
    write_logit_folder(llm_dir, tmp / "proxy", tmp / "adapter", out, key, beta=0.8, source_round=2)
    return out


def server_folder(d: Path, keyset) -> Path:
    """``server init`` of a small masking federation at ``d`` with the operator ``keyset`` pinned."""
    from fedproxy_secure.artifacts import save_keyset
    from fedproxy_secure.protocol.settings import FederationSettings
    from fedproxy_secure.server.setup import init_server, server_paths

    init_server(d, FederationSettings.from_dict(dict(rounds=1, min_clients=2, threshold=2, mode="masking", dim=8,
                                                     clip_norm=1.0)))
    save_keyset(keyset, server_paths(d)["keyset"])
    return d


def site(d: Path, tmp: Path, name: str, enrol: bool) -> Path:
    """A site folder with a CA-signed client certificate for ``name``; enrolled in the store when ``enrol``."""
    from fedproxy_secure.server.setup import server_paths
    from fedproxy_secure.server.store import SQLiteStore
    from fedproxy_secure.transport.pki import CertPair, issue_client_cert

    p = server_paths(d)
    out = tmp / "sites" / name
    issue_client_cert(CertPair(p["ca"], p["ca_key"]), name, out)
    if enrol:
        store = SQLiteStore(p["db"])
        try:
            store.enroll(store.add_token(name), os.urandom(32))
        finally:
            store.close()
    return out


def site_tls(ca: Path, site_dir: Path) -> ssl.SSLContext:
    """Client TLS context: verifies the server against ``ca``, presents the site's certificate."""
    tls = ssl.create_default_context(cafile=str(ca))
    tls.load_cert_chain(str(site_dir / "client.pem"), str(site_dir / "client.key"))
    return tls


def flood(url: str, ca: str, site_dir: str, model: str, connections: int, max_tokens: int, prompt: str,
          stop_file: str, out: str, seconds: float = 600.0) -> None:
    """The load test's flooding site: ``connections`` keep-alive connections, each sending the next
    completion as soon as the last answer (or refusal) came back, until ``stop_file`` exists (or
    ``seconds`` passed); writes its counts to ``out``."""
    import httpx

    counts = {"ok": 0, "refused": 0, "errors": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    stop = Path(stop_file)

    def one() -> None:
        with httpx.Client(verify=site_tls(Path(ca), Path(site_dir)), timeout=120) as http:
            while time.monotonic() < deadline and not stop.exists():
                try:
                    r = http.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt,
                                                                  "max_tokens": max_tokens})
                    key = "ok" if r.status_code == 200 else "refused"
                except httpx.HTTPError:
                    key = "errors"
                with lock:
                    counts[key] += 1

    threads = [threading.Thread(target=one) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(out).write_text(json.dumps(counts))
