"""CKKS encryption and decryption on every core: worker processes for independent ciphertext chunks.

TenSEAL's ``ckks_vector`` holds the GIL and encrypts one ciphertext on one thread, so threads do not
help; ciphertexts are independent, so ``w`` processes can each encrypt (or decrypt) a contiguous
share of a vector's chunks. :class:`CKKSWorkers` runs ``w - 1`` child processes and does the first
share in the calling process, so ``w`` cores work at once.

Guarantees:

* **Same wire format.** A child runs exactly what the serial path runs (``ts.ckks_vector(ctx,
  chunk).serialize()`` on a context loaded with the same parameters and scale; decryption through
  the same strict :func:`fedproxy_secure.secagg.he._ckks_from` checks), and results come back in
  chunk order. Decryption is deterministic, so the parallel result equals the serial one exactly.
* **No pickle.** Children are ``python -m fedproxy_secure.secagg.he_workers`` subprocesses that
  speak length-prefixed msgpack over their stdin/stdout: the context travels as TenSEAL's own
  serialisation (bytes), values as little-endian float64 bytes, ciphertexts as bytes.
* **Secrets.** Only for decryption (and for ``symmetric`` encryption) does the serialised *secret*
  context go to a child; children are the key holder's own processes on its own machine, never
  print or log a payload, keep at most :data:`CONTEXT_CACHE` contexts and drop them on ``forget``
  or exit. A child that dies or answers malformed data is reported as ``RuntimeError``; a child's
  check failure on a ciphertext is re-raised as the same ``SecurityError`` the serial path raises.

Pool size: :func:`default_workers` (set by ``client join``'s ``he_workers`` and ``bench scale``
through :func:`set_default_workers`; 1 = serial, no child process, when nothing sets it).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import struct
import subprocess
import sys
import threading
from collections import OrderedDict
from typing import BinaryIO, Sequence

import msgpack
import numpy as np

#: contexts a child keeps (by SHA-256 of their serialisation); older ones are dropped
CONTEXT_CACHE = 2
#: largest message either side accepts (a share of a 2^28-value vector fits: ~134 KB per 4096 values)
_MAX_MESSAGE = 16 << 30
_LEN = struct.Struct(">Q")

_default_workers = 1
_shared: "CKKSWorkers | None" = None
_shared_lock = threading.Lock()


def resolve_workers(threads: int | None) -> int:
    """``threads`` when given (>= 1), else ``os.cpu_count()``: the pool size for ``--threads``."""
    if threads is None:
        return max(1, os.cpu_count() or 1)
    if int(threads) < 1:
        raise ValueError(f"HE workers: {threads} must be >= 1")
    return int(threads)


def set_default_workers(workers: int | None) -> int:
    """Set the process-wide pool size used where no ``workers`` is given (``None``: ``os.cpu_count()``)."""
    global _default_workers
    _default_workers = resolve_workers(workers)
    return _default_workers


def default_workers() -> int:
    """The process-wide pool size (1 unless :func:`set_default_workers` changed it)."""
    return _default_workers


def shared_workers(workers: int) -> "CKKSWorkers | None":
    """The process-wide pool of ``workers`` processes (kept across rounds; ``None`` for 1 = serial).

    A pool of another size is closed and replaced.
    """
    global _shared
    if workers <= 1:
        return None
    with _shared_lock:
        if _shared is None or _shared.workers != workers or _shared.closed:
            if _shared is not None:
                _shared.close()
            _shared = CKKSWorkers(workers)
        return _shared


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[start, stop)`` ranges covering ``0..n`` whose sizes differ by at most one."""
    parts = max(1, min(parts, n))
    q, r = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + q + (1 if i < r else 0)
        out.append((start, stop))
        start = stop
    return out


# ----------------------------------------------------------------------------- framing


def _write(stream: BinaryIO, obj: dict) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    stream.write(_LEN.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read(stream: BinaryIO) -> dict | None:
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    (size,) = _LEN.unpack(head)
    if size > _MAX_MESSAGE:
        raise RuntimeError(f"HE worker: message of {size} bytes exceeds {_MAX_MESSAGE}")
    data = stream.read(size)
    if len(data) != size:
        return None
    obj = msgpack.unpackb(data, raw=False, max_bin_len=_MAX_MESSAGE, max_array_len=2**24)
    if not isinstance(obj, dict):
        raise RuntimeError("HE worker: malformed message")
    return obj


# ----------------------------------------------------------------------------- work (both sides)


def encrypt_chunks(ctx, chunks: Sequence[np.ndarray]) -> list[bytes]:
    """Serialised ``ckks_vector`` of each chunk under ``ctx``: the shipped wire format."""
    import tenseal as ts

    return [ts.ckks_vector(ctx, np.asarray(c, dtype=np.float64).tolist()).serialize() for c in chunks]


def decrypt_chunks(ctx, blobs: Sequence[bytes], sizes: Sequence[int], params, what: str) -> np.ndarray:
    """Strictly parse (``_ckks_from``) and decrypt each ciphertext; the values concatenated."""
    from fedproxy_secure.secagg.he import _ckks_from

    out = np.empty(int(sum(sizes)), dtype=np.float64)
    pos = 0
    for blob, size in zip(blobs, sizes):
        out[pos : pos + size] = _ckks_from(ctx, blob, params, size, what).decrypt()
        pos += size
    return out


# ----------------------------------------------------------------------------- child process


def _serve(inp: BinaryIO, out: BinaryIO) -> None:
    """A child's loop: ``enc`` / ``dec`` / ``forget`` requests until EOF or ``stop``."""
    from fedproxy_secure.secagg.he import _load_context
    from fedproxy_secure.secagg.he_params import validate_params

    contexts: OrderedDict[bytes, object] = OrderedDict()
    while True:
        req = _read(inp)
        if req is None or req.get("op") == "stop":
            return
        if req.get("op") == "forget":
            contexts.clear()
            _write(out, {"ok": True})
            continue
        try:
            p = req["params"]
            params = validate_params(p["poly_modulus_degree"], p["coeff_mod_bit_sizes"], p["scale_bits"], p["encryption"])
            key = bytes(req["key"])
            if key not in contexts:
                if "ctx" not in req:
                    _write(out, {"ok": False, "need_ctx": True})
                    continue
                contexts[key] = _load_context(bytes(req["ctx"]), params)
                while len(contexts) > CONTEXT_CACHE:
                    contexts.popitem(last=False)
            contexts.move_to_end(key)
            ctx = contexts[key]
            if req["op"] == "enc":
                res = encrypt_chunks(ctx, [np.frombuffer(c, dtype="<f8") for c in req["chunks"]])
            elif req["op"] == "dec":
                res = decrypt_chunks(ctx, [bytes(b) for b in req["blobs"]], [int(s) for s in req["sizes"]], params,
                                     str(req.get("what", "HE ciphertext"))).astype("<f8").tobytes()
            else:
                raise ValueError(f"unknown op {req.get('op')!r}")
            _write(out, {"ok": True, "out": res})
        except Exception as exc:  # reported to the parent, which re-raises it; never a payload
            _write(out, {"ok": False, "kind": type(exc).__name__, "error": str(exc)[:2000]})


# ----------------------------------------------------------------------------- parent side


class _Child:
    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "fedproxy_secure.secagg.he_workers"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.chunks_done = 0
        self.known: OrderedDict[bytes, None] = OrderedDict()  # mirrors the child's context cache

    def request(self, req: dict, key: bytes, ctx_bytes: bytes) -> dict:
        """``req`` with the context attached unless the child already holds it (same LRU as the child's)."""
        if key in self.known:
            self.known.move_to_end(key)
            return req
        self.known[key] = None
        while len(self.known) > CONTEXT_CACHE:
            self.known.popitem(last=False)
        return dict(req, ctx=ctx_bytes)

    def send(self, obj: dict) -> None:
        _write(self.proc.stdin, obj)

    def recv(self) -> dict:
        rep = _read(self.proc.stdout)
        if rep is None:
            raise RuntimeError(f"HE worker process {self.proc.pid} exited (status {self.proc.poll()})")
        return rep

    def close(self) -> None:
        try:
            self.send({"op": "stop"})
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


class CKKSWorkers:
    """``workers`` processes encrypting/decrypting CKKS chunks: this one plus ``workers - 1`` children.

    Thread-safe (one call at a time). ``chunks_by_children`` counts the chunks children handled.
    """

    def __init__(self, workers: int) -> None:
        if int(workers) < 2:
            raise ValueError("CKKSWorkers needs >= 2 workers (1 is the serial path)")
        self.workers = int(workers)
        self._children = [_Child() for _ in range(self.workers - 1)]
        self._lock = threading.Lock()
        self.closed = False
        self.chunks_by_children = 0
        atexit.register(self.close)

    def _run(self, op: str, ctx_bytes: bytes, params, items: list, local, payload) -> list:
        """Split ``items`` in contiguous shares: share 0 here (``local``), the others in children
        (``payload(share) -> request fields``); results in order."""
        shares = split(len(items), self.workers)
        if len(shares) < 2:
            return [local(items)]
        if self.closed:
            raise RuntimeError("HE workers: the pool is closed")
        key = hashlib.sha256(ctx_bytes).digest()
        with self._lock:
            busy = []
            for child, (a, b) in zip(self._children, shares[1:]):
                req = {"op": op, "key": key, "params": params.to_json(), **payload(items[a:b])}
                child.send(child.request(req, key, ctx_bytes))
                busy.append((child, req))
            mine = local(items[shares[0][0] : shares[0][1]])
            results = [mine]
            for (child, req), (a, b) in zip(busy, shares[1:]):
                rep = child.recv()
                if not rep.get("ok") and rep.get("need_ctx"):
                    child.send(dict(req, ctx=ctx_bytes))
                    rep = child.recv()
                if not rep.get("ok"):
                    _reraise(rep)
                child.chunks_done += b - a
                self.chunks_by_children += b - a
                results.append(rep["out"])
        return results

    def encrypt(self, ctx, ctx_bytes: bytes, params, chunks: list[np.ndarray]) -> list[bytes]:
        """``encrypt_chunks(ctx, chunks)`` over the pool (``ctx_bytes``: ``ctx``'s serialisation)."""
        parts = self._run("enc", ctx_bytes, params, chunks, lambda cs: encrypt_chunks(ctx, cs),
                          lambda cs: {"chunks": [np.asarray(c, dtype="<f8").tobytes() for c in cs]})
        out: list[bytes] = []
        for p in parts:
            if not isinstance(p, list) or not all(isinstance(b, bytes) for b in p):
                raise RuntimeError("HE worker: malformed encryption reply")
            out.extend(p)
        if len(out) != len(chunks):
            raise RuntimeError(f"HE workers returned {len(out)} ciphertexts for {len(chunks)} chunks")
        return out

    def decrypt(self, ctx, ctx_bytes: bytes, params, blobs: list[bytes], sizes: list[int], what: str) -> np.ndarray:
        """``decrypt_chunks`` over the pool: the same values as the serial call, in order."""
        items = list(zip(blobs, sizes))
        parts = self._run("dec", ctx_bytes, params, items,
                          lambda it: decrypt_chunks(ctx, [b for b, _ in it], [s for _, s in it], params, what),
                          lambda it: {"blobs": [b for b, _ in it], "sizes": [s for _, s in it], "what": what})
        vals = [p if isinstance(p, np.ndarray) else np.frombuffer(p, dtype="<f8") for p in parts]
        out = np.concatenate(vals).astype(np.float64)
        if out.size != sum(sizes):
            raise RuntimeError("HE workers returned the wrong number of decrypted values")
        return out

    def forget(self) -> None:
        """Drop every context the children hold (e.g. after a key holder's last decryption)."""
        with self._lock:
            for c in self._children:
                c.known.clear()
                c.send({"op": "forget"})
            for c in self._children:
                c.recv()

    def close(self) -> None:
        """Stop the children (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for c in self._children:
            c.close()


def _reraise(rep: dict) -> None:
    from fedproxy_secure.errors import ConfigError, SecurityError

    kind, msg = str(rep.get("kind", "")), str(rep.get("error", "HE worker failed"))
    if kind == "SecurityError":
        raise SecurityError(msg)
    if kind == "ConfigError":
        raise ConfigError(msg)
    raise RuntimeError(f"HE worker: {kind}: {msg}")


if __name__ == "__main__":
    # replies go to a private copy of stdout; anything a library prints lands on stderr instead
    _reply = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _serve(sys.stdin.buffer, _reply)
