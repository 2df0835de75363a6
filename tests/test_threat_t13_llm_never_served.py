"""T13: the real server on loopback serves no LLM tensor on any route.

A tiny LLM (6 blocks) sits in the server folder; its proxy (3 blocks kept verbatim) is published as
the signed bundle; a federation round runs with three client processes. Then every route of the
FastAPI app is enumerated and fetched (every stage, every state round, every bundle file, path
traversal towards the LLM, signed and unsigned), and every response body, plus any base64 string in
a JSON body decoded, is scanned for:

- bytes of each LLM-only block (the blocks the proxy did not keep), as float32 and float64 windows;
- the LLM-only tensor names of the LLM's safetensors header and the header itself.

Sanity: the same scanner finds the kept blocks' bytes in the served bundle (it sees tensors), and
finds the LLM-only needles in the LLM file itself.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedproxy_secure.artifacts import generate_key, issue_bundle
from fedproxy_secure.artifacts.keys import load_private_key
from fedproxy_secure.server.app import ROUTE_STAGES, ServerContext, create_app
from fedproxy_secure.transport.http import SignedClient
from tests.net_helpers import db_rounds, make_server, start_client, start_server, stop, wait_for

LAYERS = 6
B64_RE = re.compile(rb"[A-Za-z0-9+/_-]{44,}={0,2}")


def _llm_and_proxy(srv: Path, tmp: Path) -> tuple[Path, Path, list[int]]:
    import torch

    torch.set_num_threads(1)
    from compress_helpers import TEXTS, tok
    from fedproxy_secure.compress import compress, save_proxy
    from fedproxy_secure.config import CompressConfig, TinyModelSpec
    from fedproxy_secure.models import load_causal_lm, weights_hash
    from fedproxy_secure.models.tiny import save_tiny_llm

    llm_dir = save_tiny_llm(TinyModelSpec(arch="llama", layers=LAYERS, seed=11), srv / "llm")
    proxy = compress(load_causal_lm(llm_dir), tok(), TEXTS, CompressConfig(strategy="bi", keep_ratio=0.5),
                     progress=False)
    proxy_dir = save_proxy(proxy, tok(), tmp / "proxy", base_model_hash=weights_hash(llm_dir))
    issue_bundle(proxy_dir, generate_key(), version=1, valid_days=30, out_dir=srv / "bundle")
    return llm_dir / "model.safetensors", srv / "bundle", list(proxy.meta["layer_map"])


def _block_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _needles(tensors: dict[str, np.ndarray], names: list[str]) -> list[tuple[str, bytes]]:
    """32-byte windows (start, middle, end) of each named tensor, as float32 and as float64."""
    out = []
    for n in names:
        for dt in ("<f4", "<f8"):
            raw = np.ascontiguousarray(tensors[n].astype(dt)).tobytes()
            for off in (0, len(raw) // 2 - 16, len(raw) - 32):
                out.append((f"{n}/{dt}@{off}", raw[off:off + 32]))
    return out


def _corpus(body: bytes) -> list[bytes]:
    """The body and every base64 string inside it, decoded (standard or URL-safe alphabet)."""
    out = [body]
    for m in B64_RE.finditer(body):
        s = m.group(0)
        for dec in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                out.append(dec(s + b"=" * (-len(s) % 4)))
            except (ValueError, TypeError):
                pass
    return out


def _paths(route_path: str, rids, stages, rounds, names) -> list[tuple[str, int | None]]:
    """Concrete (path, round id) pairs for a route template."""
    fills = [(route_path, None)]
    for param, values in (("{rid}", rids), ("{stage}", stages), ("{rnd}", rounds), ("{name:path}", names),
                          ("{index}", (0,))):
        nxt = []
        for p, rid in fills:
            if param not in p:
                nxt.append((p, rid))
                continue
            for v in values:
                nxt.append((p.replace(param, str(v)), v if param == "{rid}" else rid))
        fills = nxt
    return fills


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t13")
    srv, port = make_server(tmp, 3, rounds=1, dim=8)
    llm_file, bundle, layer_map = _llm_and_proxy(srv, tmp)
    p = start_server(srv, port, ["--bundle", str(bundle), "--poll", "0.3"])
    clients = [start_client(srv, i, tmp) for i in range(3)]
    bodies: dict[str, bytes] = {}
    try:
        wait_for(lambda: any(r[1] == "done" for r in db_rounds(srv)), 120, "the round to finish")
        for c in clients:
            c.wait(60)
        st = tmp / "client0"
        cid = json.loads((st / "enrolment.json").read_text())["client_id"]
        e = srv / "enrol" / "site0"
        http = SignedClient(f"https://127.0.0.1:{port}", e / "ca.pem", e / "client.pem", e / "client.key",
                            load_private_key(st / "identity.key"), cid, retry_s=5)
        app = create_app(ServerContext(store=None, engine=None, audit=None, verifier=None))  # type: ignore[arg-type]
        manifest = json.loads((bundle / "MANIFEST.json").read_text())
        names = ["MANIFEST.json", "MANIFEST.sig", *[f["path"] for f in manifest["files"]],
                 "../llm/model.safetensors", "..%2Fllm%2Fmodel.safetensors", "llm/model.safetensors",
                 f"{'../' * 3}{srv.name}/llm/model.safetensors", "model.safetensors/../../llm/model.safetensors"]
        all_stages = list(ROUTE_STAGES) + ["config", "result", "llm", "fused"]
        some_stages = ["join", "masked_input", "unmask", "config"]  # for routes that only accept messages
        routes = [(r.path, sorted(getattr(r, "methods", None) or ())) for r in app.routes]
        assert len(routes) >= 10, routes
        for path_t, methods in routes:
            for method in methods:
                if method == "HEAD":
                    continue
                serves = method == "GET" and path_t in ("/v1/round/{rid}/{stage}", "/v1/bundle/{name:path}",
                                                        "/v1/state/{rnd}")
                fills = _paths(path_t, (1, 2) if serves else (1,), all_stages if serves else some_stages,
                               (0, 1, 2), names)
                body = b"{}" if method in ("POST", "PUT") else b""
                for path, rid in fills:
                    r = http.request(method, path, body, round_id=rid if rid is not None else "-")
                    bodies[f"{method} {path} (signed)"] = r.content
                path = fills[0][0]  # unsigned: refused before any handler; once per route suffices
                raw = http.http.request(method, f"https://127.0.0.1:{port}{path}", content=body)
                bodies[f"{method} {path} (unsigned)"] = raw.content
        http.close()
    finally:
        for c in clients:
            stop(c)
        stop(p)
    yield llm_file, layer_map, bodies


def test_every_route_was_fetched(served):
    _, _, bodies = served
    fetched = {k.split(" ")[1] for k in bodies}
    assert "/v1/state/1" in fetched and "/v1/round/1/result" in fetched and "/v1/status" in fetched
    assert any(k.startswith("POST /v1/round/1/") and k.endswith("/upload/commit (signed)") for k in bodies)
    # the federation really ran: the round's result and the final state were served
    assert b"sum_b64" in bodies["GET /v1/round/1/result (signed)"]
    assert bodies["GET /v1/state/1 (signed)"][:8] != b"" and len(bodies["GET /v1/state/1 (signed)"]) > 64


def test_no_body_carries_an_llm_only_tensor(served):
    llm_file, layer_map, bodies = served
    tensors = load_file(str(llm_file))
    dropped = sorted(set(range(LAYERS)) - set(layer_map))
    assert len(dropped) == LAYERS - len(layer_map) == 3
    llm_only = sorted(n for n in tensors if _block_of(n) in dropped)
    kept = sorted(n for n in tensors if _block_of(n) in layer_map)
    assert llm_only and kept
    # what legitimately ships: every tensor but the LLM-only blocks (a random tiny model's layer norms
    # are all ones, so some windows of dropped blocks also occur in kept ones: those cannot be evidence)
    shipped = b"".join(np.ascontiguousarray(tensors[n].astype(dt)).tobytes()
                       for n in tensors if n not in llm_only for dt in ("<f4", "<f8"))
    needles = [(label, n) for label, n in _needles(tensors, llm_only) if n not in shipped]
    matrices = {n for n in llm_only if tensors[n].ndim == 2}
    assert matrices and {label.split("/")[0] for label, _ in needles} >= matrices  # every weight matrix
    llm_bytes = llm_file.read_bytes()
    header = llm_bytes[: 8 + int.from_bytes(llm_bytes[:8], "little")]
    # sanity 1: the needles are real (found in the LLM file, float32 ones at least)
    assert all(n in llm_bytes for label, n in needles if "<f4" in label)
    # sanity 2: the scanner sees tensors: kept blocks ship verbatim in the served bundle
    served_all = b"".join(x for b in bodies.values() for x in _corpus(b))
    kept_needles = _needles(tensors, kept)
    assert all(n in served_all for label, n in kept_needles if "<f4" in label)
    # the LLM-only block names (the proxy renumbers its 3 blocks 0..2; blocks 3..5 exist only in the LLM)
    only_names = [f"model.layers.{i}.".encode() for i in range(len(layer_map), LAYERS)]

    def scan(body: bytes) -> list[str]:
        found = []
        for chunk in _corpus(body):
            found += [label for label, n in needles if n in chunk]
            found += [n.decode() for n in only_names if n in chunk]
            if header[8:] in chunk:  # the LLM's whole tensor table (the proxy's differs)
                found.append("LLM safetensors header")
        return found

    # sanity 3: the scanner flags the LLM file served raw, as base64 in JSON, or one block as float64
    assert "LLM safetensors header" in scan(llm_bytes) and len(scan(llm_bytes)) >= len(matrices)
    for dt in ("<f4", "<f8"):
        one = np.ascontiguousarray(tensors[sorted(matrices)[0]].astype(dt)).tobytes()
        assert scan(json.dumps({"vector": base64.b64encode(one).decode()}).encode()), dt
    hits = [(where, f) for where, body in bodies.items() for f in scan(body)]
    assert hits == [], hits[:10]
