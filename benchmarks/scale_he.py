"""HE encryption: the encodings tried for issue 19's 1.0 µs/value target (``bench scale --he-explore``).

Every variant encrypts with the *public* key of a fresh CKKS context that a client loads from the
public descriptor bytes (no secret key), as :class:`ClientEncryptor` does, and serialises the result
(the bytes a client would send). Variants:

* ``vector``: one ``ts.ckks_vector`` per ``N/2`` values (the shipped wire format);
* ``tensor``: one ``ts.ckks_tensor(..., batch=True)`` holding all chunks (``N/2`` x k), which TenSEAL
  encrypts column by column on the context's thread pool (``n_threads``);
* ``vector-procs``: the shipped ``ckks_vector`` wire format, chunks split over ``n_threads`` worker
  processes that already hold the public context (TenSEAL's ``ckks_vector`` keeps the GIL and runs
  one ciphertext on one thread, so processes are the only way to use a second core without changing
  the wire); the pool is started before timing (a client would keep it across rounds);

for N = 4096 and 8192 with the shipped coefficient moduli [60, 40] (100 bits: within the 109-bit
128-bit-security bound for N = 4096, and far within 218 for N = 8192; :func:`validate_params`
checks each set). Timings are the best of ``repeats`` runs (the machine is shared), µs per value
including serialisation; bytes per value are of the serialised ciphertexts.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

VARIANTS = ("vector", "tensor", "vector-procs")
POLY_DEGREES = (4096, 8192)


def _public_context(n: int, bits: tuple[int, ...], threads: int):
    import tenseal as ts

    sk = ts.context(ts.SCHEME_TYPE.CKKS, n, coeff_mod_bit_sizes=list(bits),
                    encryption_type=ts.ENCRYPTION_TYPE.ASYMMETRIC, n_threads=1)
    pub = sk.serialize(save_secret_key=False)
    ctx = ts.context_from(pub, n_threads=threads)
    ctx.global_scale = 2.0**40
    assert not ctx.has_secret_key()
    return ctx, sk


_WORKER: dict = {}


def _worker_init(ctx_bytes: bytes) -> None:
    import tenseal as ts

    ctx = ts.context_from(ctx_bytes, n_threads=1)
    ctx.global_scale = 2.0**40
    _WORKER["ctx"] = ctx


def _worker_encrypt(chunk: np.ndarray) -> bytes:
    import tenseal as ts

    return ts.ckks_vector(_WORKER["ctx"], chunk.tolist()).serialize()


def encrypt_variant(x: np.ndarray, ctx, variant: str, slots: int, pool=None) -> list[bytes]:
    """Encrypt ``x`` with ``variant`` under ``ctx`` (``pool``: worker processes for ``vector-procs``)."""
    import tenseal as ts

    if variant == "vector-procs":
        return pool.map(_worker_encrypt, [x[i : i + slots] for i in range(0, x.size, slots)])
    if variant == "vector":
        return [ts.ckks_vector(ctx, x[i : i + slots].tolist()).serialize() for i in range(0, x.size, slots)]
    if variant == "tensor":
        k = -(-x.size // slots)
        pad = np.zeros(k * slots)
        pad[: x.size] = x
        cols = pad.reshape(k, slots).T  # (slots, k): batch=True packs axis 0 into the slots of k ciphertexts
        return [ts.ckks_tensor(ctx, ts.plain_tensor(cols.ravel().tolist(), [slots, k]), batch=True).serialize()]
    raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")


def decrypt_variant(blobs: list[bytes], sk_ctx, variant: str, n: int) -> np.ndarray:
    """Decrypt what :func:`encrypt_variant` produced with the secret context (correctness check)."""
    import tenseal as ts

    if variant in ("vector", "vector-procs"):
        return np.concatenate([np.asarray(ts.ckks_vector_from(sk_ctx, b).decrypt()) for b in blobs])[:n]
    t = ts.ckks_tensor_from(sk_ctx, blobs[0]).decrypt()
    return np.asarray(t.tolist()).T.ravel()[:n]


def explore(values: int = 100_000, threads: tuple[int, ...] = (1, 2), repeats: int = 3,
            degrees: tuple[int, ...] = POLY_DEGREES, bits: tuple[int, ...] = (60, 40), seed: int = 0) -> list[dict]:
    """µs/value and B/value for each (variant, N, n_threads); each row checks its decryption (max error)."""
    from fedproxy_secure.secagg.he_params import validate_params

    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, values)
    rows = []
    for n in degrees:
        params = validate_params(n, bits, 40, "public")  # refuses any set below 128-bit security
        for th in threads:
            ctx, sk = _public_context(n, bits, th)
            sk.global_scale = 2.0**40
            for variant in VARIANTS:
                if variant == "vector-procs" and th < 2:
                    continue  # one process is the plain vector row
                times, blobs, pool = [], None, None
                if variant == "vector-procs":
                    import multiprocessing as mp

                    pool = mp.get_context("fork").Pool(th, initializer=_worker_init, initargs=(ctx.serialize(),))
                    pool.map(_worker_encrypt, [x[:8]] * th)  # warm: every worker has its context
                try:
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        blobs = encrypt_variant(x, ctx, variant, params.slots, pool)
                        times.append(time.perf_counter() - t0)
                finally:
                    if pool is not None:
                        pool.terminate()
                        pool.join()
                err = float(np.abs(decrypt_variant(blobs, sk, variant, values) - x).max())
                rows.append({"variant": variant, "poly_modulus_degree": n, "coeff_mod_bit_sizes": list(bits),
                             "threads": th, "values": values, "encrypt_us_per_value": min(times) / values * 1e6,
                             "encrypt_us_per_value_median": float(np.median(times)) / values * 1e6,
                             "bytes_per_value": sum(len(b) for b in blobs) / values, "max_abs_error": err,
                             "security_bits": 128, "shipped": variant == "vector" and n == 8192,
                             "same_wire_as_shipped": variant != "tensor"})
    return rows


def print_table(rows: list[dict], console) -> None:
    """The explored encodings as a rich table."""
    from rich.table import Table

    t = Table(title="HE encodings tried for the 1.0 µs/value target (public key, serialised, best of runs)")
    for col in ("encoding", "N", "n_threads", "µs/value", "median", "B/value", "max err", "shipped"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["variant"], str(r["poly_modulus_degree"]), str(r["threads"]), f"{r['encrypt_us_per_value']:.3f}",
                  f"{r['encrypt_us_per_value_median']:.3f}", f"{r['bytes_per_value']:.2f}", f"{r['max_abs_error']:.1e}",
                  "yes" if r["shipped"] else "")
    console.print(t)


def write_plot(rows: list[dict], folder: str | Path) -> Path:
    """Grouped bars: µs/value per encoding and N, one bar per thread count; the 1.0 target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups = sorted({(r["variant"], r["poly_modulus_degree"]) for r in rows}, key=lambda g: (g[1], g[0]))
    threads = sorted({r["threads"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    w = 0.8 / max(1, len(threads))
    for j, th in enumerate(threads):
        ys = [next((r["encrypt_us_per_value"] for r in rows if (r["variant"], r["poly_modulus_degree"]) == g
                    and r["threads"] == th), 0.0) for g in groups]
        ax.bar([i + j * w for i in range(len(groups))], ys, width=w, label=f"n_threads={th}")
    ax.axhline(1.0, color="grey", ls="--", label="target 1.0")
    ax.set_xticks([i + w * (len(threads) - 1) / 2 for i in range(len(groups))],
                  [f"{v}\nN={n}" for v, n in groups], fontsize=8)
    ax.set_ylabel("µs per value (encrypt + serialise)")
    ax.set_title(f"HE encodings, {rows[0]['values']:,} values", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / "he_encodings_us_per_value.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
