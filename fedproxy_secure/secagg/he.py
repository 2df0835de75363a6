"""Secure aggregation by homomorphic encryption (TenSEAL CKKS, ``ckks_vector`` only).

Roles (DESIGN.md section 4):

* :class:`KeyHolder` - a client chosen at enrolment. Makes a *fresh* CKKS context with a secret
  key, hands other key holders the secret context over a channel the server never sees, hands
  everyone else (server included) only the public descriptor, and decrypts the aggregate when the
  server's *signed* statement shows at least ``t`` contributions. Before returning the plaintext
  it floods it with Gaussian noise and rounds it (CKKS IND-CPA-D, eprint 2020/1533).
* :class:`ClientEncryptor` - encrypts one client's vector into an envelope (msgpack: a header
  binding it to the context fingerprint, the round and the client, then one ciphertext per 4096
  values). The chunks are independent: with ``workers`` > 1 they are encrypted by that many
  processes (:mod:`fedproxy_secure.secagg.he_workers`), same wire format; the key holder decrypts
  the aggregate's chunks the same way.
* :class:`ServerAggregatorHE` - holds only the public descriptor (it refuses one that carries a
  secret key), strictly parses envelopes, adds ciphertexts (integer weights by double-and-add, so
  no plaintext multiplication level is needed) and signs the statement of who contributed.
* :class:`CKKSSummer` - the three roles in one process behind :class:`SecureSummer`.

Trust: server + any key holder recover every client's vector (see SECURITY.md, Homomorphic encryption).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Mapping

import msgpack
import numpy as np
import tenseal as ts
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedproxy_secure.errors import ConfigError, ProtocolAbort, SecurityError
from fedproxy_secure.secagg import he_workers
from fedproxy_secure.secagg.base import DropoutPlan, SecureSumResult
from fedproxy_secure.secagg.he_params import CKKSParams, check_capacity, validate_params

WIRE_VERSION = 1
MAX_WEIGHT = 2**16  # integer weights (e.g. sample counts) above this are refused
MAX_VALUES = 2**28  # one envelope never carries more values than this
_DESCRIPTOR_LIMIT = 4 * 2**20  # a public descriptor is ~235 KB for N = 8192


# ----------------------------------------------------------------------------- helpers


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _session_tag(session_id: bytes) -> bytes:
    return _sha256(b"fedproxy-secure/he/session|" + bytes(session_id))


def _new_context(params: CKKSParams) -> ts.Context:
    enc = ts.ENCRYPTION_TYPE.SYMMETRIC if params.encryption == "symmetric" else ts.ENCRYPTION_TYPE.ASYMMETRIC
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        encryption_type=enc,
        n_threads=1,
    )
    ctx.global_scale = 2.0**params.scale_bits
    return ctx


def _load_context(data: bytes, params: CKKSParams) -> ts.Context:
    try:
        ctx = ts.context_from(data, n_threads=1)
    except Exception as exc:  # TenSEAL raises ValueError/RuntimeError on malformed buffers
        raise SecurityError(f"HE context: cannot be parsed ({exc}); it is truncated or not a CKKS context") from exc
    ctx.global_scale = 2.0**params.scale_bits
    return ctx


def _unpack(data: bytes, what: str, *, max_bin: int, max_array: int) -> dict:
    if not isinstance(data, (bytes, bytearray)):
        raise SecurityError(f"{what}: expected bytes, got {type(data).__name__}")
    try:
        obj = msgpack.unpackb(
            bytes(data), raw=False, strict_map_key=True, max_bin_len=max_bin,
            max_array_len=max_array, max_map_len=32, max_str_len=256,
        )
    except Exception as exc:
        raise SecurityError(f"{what}: not a valid message ({exc}); it is truncated or corrupt") from exc
    if not isinstance(obj, dict) or obj.get("v") != WIRE_VERSION:
        raise SecurityError(f"{what}: unknown format or version (expected v={WIRE_VERSION})")
    return obj


def _csprng_normal(n: int) -> np.ndarray:
    """``n`` standard normal samples from a ChaCha20 keystream keyed by ``os.urandom`` (Box-Muller)."""
    if n <= 0:
        return np.zeros(0)
    m = (n + 1) // 2
    enc = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None).encryptor()
    raw = np.frombuffer(enc.update(bytes(16 * m)), dtype="<u8").reshape(m, 2)
    u1 = ((raw[:, 0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53  # (0, 1]
    u2 = (raw[:, 1] >> np.uint64(11)).astype(np.float64) / 2.0**53  # [0, 1)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])
    return z[:n]


# ----------------------------------------------------------------------------- public descriptor


@dataclass(frozen=True)
class PublicContext:
    """What the server and non-key-holding clients receive: parameters, key id, public context."""

    params: CKKSParams
    key_id: bytes
    context_bytes: bytes  # TenSEAL context serialised with save_secret_key=False
    raw: bytes  # the msgpack descriptor exactly as sent

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the descriptor: binds every ciphertext to this key set."""
        return _sha256(self.raw)

    @staticmethod
    def parse(raw: bytes) -> "PublicContext":
        """Parse a descriptor; raise ``SecurityError`` if malformed or if it carries a secret key."""
        obj = _unpack(raw, "HE public context", max_bin=_DESCRIPTOR_LIMIT, max_array=64)
        try:
            p = obj["params"]
            params = validate_params(
                p["poly_modulus_degree"], p["coeff_mod_bit_sizes"], p["scale_bits"], p["encryption"]
            )
            key_id, ctx_bytes = bytes(obj["key_id"]), bytes(obj["ctx"])
        except (KeyError, TypeError) as exc:
            raise SecurityError(f"HE public context: missing or ill-typed field {exc}") from exc
        if len(key_id) != 16:
            raise SecurityError("HE public context: key_id must be 16 bytes")
        ctx = _load_context(ctx_bytes, params)
        if ctx.is_private() or ctx.has_secret_key():
            raise SecurityError(
                "HE public context: it contains the SECRET key; the server must only ever receive the "
                "public context (KeyHolder.public_descriptor())"
            )
        return PublicContext(params, key_id, ctx_bytes, bytes(raw))


# ----------------------------------------------------------------------------- envelopes


def _ckks_from(ctx: ts.Context, blob: bytes, params: CKKSParams, n_expected: int, what: str) -> ts.CKKSVector:
    """Deserialise one ciphertext with strict checks; ``SecurityError`` on anything unexpected."""
    if not isinstance(blob, (bytes, bytearray)) or not 64 <= len(blob) <= params.max_ciphertext_bytes:
        size = len(blob) if isinstance(blob, (bytes, bytearray)) else "?"
        raise SecurityError(
            f"{what}: ciphertext of {size} bytes is outside 64..{params.max_ciphertext_bytes} bytes"
        )
    try:
        vec = ts.ckks_vector_from(ctx, bytes(blob))
        cts = vec.ciphertext()
        shape_ok = (
            vec.size() == n_expected
            and len(cts) == 1
            and cts[0].size() == 2
            and cts[0].poly_modulus_degree() == params.poly_modulus_degree
            and cts[0].coeff_modulus_size() == params.data_primes
            and cts[0].scale == 2.0**params.scale_bits
        )
    except SecurityError:
        raise
    except Exception as exc:
        raise SecurityError(
            f"{what}: ciphertext cannot be parsed under this context ({exc}); it is truncated or was "
            "made with other CKKS parameters"
        ) from exc
    if not shape_ok:
        raise SecurityError(
            f"{what}: ciphertext does not match the context (expected {n_expected} slots, 2 polys, "
            f"N={params.poly_modulus_degree}, {params.data_primes} prime(s), scale 2^{params.scale_bits})"
        )
    return vec


def _chunk_sizes(n: int, slots: int) -> list[int]:
    return [min(slots, n - i) for i in range(0, n, slots)]


def _parse_envelope(data: bytes, params: CKKSParams, fingerprint: bytes, session_tag: bytes, what: str) -> dict:
    max_chunks = MAX_VALUES // params.slots + 1
    obj = _unpack(data, what, max_bin=params.max_ciphertext_bytes, max_array=max_chunks)
    try:
        fp, sid, n, chunks = bytes(obj["ctx"]), bytes(obj["sid"]), int(obj["n"]), list(obj["cts"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SecurityError(f"{what}: missing or ill-typed field {exc}") from exc
    if not hmac.compare_digest(fp, fingerprint):
        raise SecurityError(
            f"{what}: encrypted under a foreign HE context (fingerprint {fp.hex()[:16]}..., expected "
            f"{fingerprint.hex()[:16]}...); re-encrypt with this federation's public context"
        )
    if not hmac.compare_digest(sid, session_tag):
        raise SecurityError(f"{what}: made for another round (session id mismatch); replay refused")
    if not 1 <= n <= MAX_VALUES or len(chunks) != len(_chunk_sizes(n, params.slots)):
        raise SecurityError(f"{what}: declares {n} values in {len(chunks)} ciphertexts, which do not match")
    obj["n"], obj["cts"] = n, chunks
    return obj


# ----------------------------------------------------------------------------- key holder


@dataclass(frozen=True)
class FloodingPolicy:
    """How the key holder sanitises a decrypted aggregate before it leaves the client side.

    sigma = ``sqrt(max_decryptions * stat_security) * B`` where B bounds the CKKS error of the
    aggregate (``fresh_error x weight_total``); the sqrt(queries) growth follows the Renyi-DP
    analysis of noise flooding (Li, Micciancio, Schultz, Sorrell, eprint 2022/816). The result is
    then rounded to a power-of-two grid at most sigma / 4. ``enabled=False`` keeps only rounding
    (to 4 B) - not IND-CPA-D secure, for experiments only.
    """

    stat_security: int = 30
    max_decryptions: int = 100
    enabled: bool = True

    def sigma(self, params: CKKSParams, weight_total: int) -> float:
        """Standard deviation of the flooding noise for an aggregate of total weight ``weight_total``."""
        if not self.enabled:
            return 0.0
        return math.sqrt(self.max_decryptions * self.stat_security) * params.fresh_error * weight_total

    def grid(self, params: CKKSParams, weight_total: int) -> float:
        """Rounding grid (power of two) applied after flooding."""
        s = self.sigma(params, weight_total)
        base = s / 4 if s > 0 else 4 * params.fresh_error * weight_total
        return 2.0 ** math.floor(math.log2(base))

    def tolerance(self, params: CKKSParams, weight_total: int) -> float:
        """Absolute per-value error bound we state: CKKS error + 7 sigma + half a grid step."""
        return params.fresh_error * weight_total + 7 * self.sigma(params, weight_total) + self.grid(
            params, weight_total
        ) / 2


class KeyHolder:
    """A client holding the CKKS secret key (made at enrolment, fresh per federation or round)."""

    def __init__(
        self,
        params: CKKSParams | None = None,
        *,
        flooding: FloodingPolicy | None = None,
        server_public_key: bytes | None = None,
        _secret_context: bytes | None = None,
        _key_id: bytes | None = None,
    ) -> None:
        """Make a fresh key set (or load a shared one) under validated ``params``."""
        self.params = params or validate_params()
        self.flooding = flooding or FloodingPolicy()
        self.server_public_key = server_public_key
        if _secret_context is None:
            self._ctx = _new_context(self.params)
            self.key_id = os.urandom(16)
        else:
            self._ctx = _load_context(_secret_context, self.params)
            if not self._ctx.is_private():
                raise SecurityError("HE key holder: the shared context has no secret key")
            self.key_id = bytes(_key_id or b"")
        public_ctx = self._ctx.serialize(
            save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )
        self._descriptor = msgpack.packb(
            {"v": WIRE_VERSION, "params": self.params.to_json(), "key_id": self.key_id, "ctx": public_ctx},
            use_bin_type=True,
        )
        self.decryptions = 0
        self.workers: int | None = None  # processes that decrypt the chunks (None: he_workers.default_workers())
        self._secret_bytes: bytes | None = None  # serialised secret context, for those worker processes only

    # -- enrolment -------------------------------------------------------------------------
    def public_descriptor(self) -> bytes:
        """Public context for the server and non-key-holding clients: never contains the secret key."""
        return self._descriptor

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of :meth:`public_descriptor`."""
        return _sha256(self._descriptor)

    def export_secret_for_key_holder(self) -> bytes:
        """The secret context for *another key holder*, to be sent over an enrolment channel the
        server never sees (e.g. the masking protocol's pairwise AEAD channel)."""
        return msgpack.packb(
            {"v": WIRE_VERSION, "key_id": self.key_id, "ctx": self._ctx.serialize(save_secret_key=True)},
            use_bin_type=True,
        )

    @classmethod
    def from_shared_secret(
        cls, data: bytes, params: CKKSParams, *, flooding: FloodingPolicy | None = None,
        server_public_key: bytes | None = None,
    ) -> "KeyHolder":
        """Load a key set exported by :meth:`export_secret_for_key_holder`."""
        obj = _unpack(data, "HE secret context", max_bin=_DESCRIPTOR_LIMIT * 2, max_array=64)
        return cls(params, flooding=flooding, server_public_key=server_public_key,
                   _secret_context=bytes(obj["ctx"]), _key_id=bytes(obj["key_id"]))

    def encryptor(self) -> "ClientEncryptor":
        """An encryptor for a client holding this key (required for ``symmetric`` encryption)."""
        return ClientEncryptor(self._descriptor, workers=self.workers, _ctx=self._ctx)

    # -- decryption --------------------------------------------------------------------------
    def decrypt_aggregate(
        self,
        aggregate: bytes,
        statement: bytes,
        signature: bytes,
        *,
        session_id: bytes,
        threshold: int,
        enrolled: frozenset[int] | None = None,
    ) -> np.ndarray:
        """Decrypt the server's aggregate, flood and round it, and return ``sum_i w_i x_i``.

        Refuses (``SecurityError``/``ProtocolAbort``) unless: the statement is signed by the pinned
        server key, names this round and this key set, lists >= ``threshold`` distinct (enrolled)
        contributors, and its digest matches ``aggregate``; and this key has decrypted fewer than
        ``flooding.max_decryptions`` aggregates (rotate keys after that).
        """
        if self.server_public_key is None:
            raise ConfigError("HE key holder: server_public_key is not pinned; set it at enrolment")
        try:
            Ed25519PublicKey.from_public_bytes(self.server_public_key).verify(signature, statement)
        except (InvalidSignature, ValueError) as exc:
            raise SecurityError("HE key holder: the server's contribution statement has a bad signature") from exc
        try:
            st = json.loads(statement)
            contributors = [int(c) for c in st["contributors"]]
            weight_total, n = int(st["weight_total"]), int(st["n"])
            st_sid, st_fp, st_digest = st["session"], st["context"], st["aggregate_sha256"]
            weights = {int(k): int(v) for k, v in st["weights"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise SecurityError(f"HE key holder: malformed contribution statement ({exc})") from exc
        if not hmac.compare_digest(st_sid, _session_tag(session_id).hex()):
            raise SecurityError("HE key holder: the statement is for another round; refusing to decrypt")
        if not hmac.compare_digest(st_fp, self.fingerprint.hex()):
            raise SecurityError("HE key holder: the statement names another key set; refusing to decrypt")
        if len(set(contributors)) != len(contributors) or set(weights) != set(contributors):
            raise SecurityError("HE key holder: the statement lists duplicate or inconsistent contributors")
        if enrolled is not None and not set(contributors) <= set(enrolled):
            raise SecurityError("HE key holder: the statement lists clients that are not enrolled")
        if any(not 1 <= w <= MAX_WEIGHT for w in weights.values()) or sum(weights.values()) != weight_total:
            raise SecurityError("HE key holder: the statement's weights are out of range or do not add up")
        if len(contributors) < threshold:
            raise ProtocolAbort(
                f"HE key holder: only {len(contributors)} contributions, threshold is {threshold}; "
                "refusing to decrypt"
            )
        if not hmac.compare_digest(st_digest, hashlib.sha256(aggregate).hexdigest()):
            raise SecurityError("HE key holder: the aggregate does not match the signed statement's digest")
        if self.decryptions >= self.flooding.max_decryptions:
            raise SecurityError(
                f"HE key holder: this key already decrypted {self.decryptions} aggregates "
                f"(flooding.max_decryptions); rotate keys (fresh KeyHolder)"
            )
        env = _parse_envelope(aggregate, self.params, self.fingerprint, _session_tag(session_id), "HE aggregate")
        if env["n"] != n:
            raise SecurityError("HE key holder: aggregate length differs from the signed statement")
        self.decryptions += 1
        sizes = _chunk_sizes(n, self.params.slots)
        blobs = list(env["cts"])
        pool = he_workers.shared_workers(self.workers or he_workers.default_workers()) if len(sizes) > 1 else None
        if pool is None or not all(isinstance(b, bytes) for b in blobs):  # the serial checks name a bad blob
            out = he_workers.decrypt_chunks(self._ctx, blobs, sizes, self.params, "HE aggregate")
        else:
            if self._secret_bytes is None:
                self._secret_bytes = self._ctx.serialize(save_secret_key=True)
            out = pool.decrypt(self._ctx, self._secret_bytes, self.params, blobs, sizes, "HE aggregate")
        return self.sanitise(out, weight_total)

    def sanitise(self, plain: np.ndarray, weight_total: int) -> np.ndarray:
        """Noise-flood then round a decrypted aggregate (IND-CPA-D mitigation, eprint 2020/1533)."""
        sigma = self.flooding.sigma(self.params, weight_total)
        if sigma > 0:
            plain = plain + sigma * _csprng_normal(plain.size)
        grid = self.flooding.grid(self.params, weight_total)
        return np.round(plain / grid) * grid


# ----------------------------------------------------------------------------- client


class ClientEncryptor:
    """Encrypts a client's vector under the federation's context (never sees the server's sum)."""

    def __init__(self, public_descriptor: bytes, *, clip: float | None = None, workers: int | None = None,
                 _ctx: ts.Context | None = None) -> None:
        """Load the public descriptor; ``clip`` (if set) bounds every |value| this client sends;
        ``workers`` processes encrypt the chunks (``None``: :func:`he_workers.default_workers`)."""
        self.public = PublicContext.parse(public_descriptor)
        self.params = self.public.params
        if _ctx is None and self.params.encryption == "symmetric":
            raise ConfigError(
                "secagg.he.encryption: 'symmetric' needs the secret key on every client; build the "
                "encryptor with KeyHolder.encryptor() or use encryption='public'"
            )
        self._ctx = _ctx if _ctx is not None else _load_context(self.public.context_bytes, self.params)
        # what a worker process loads: the public context, or (symmetric: a key holder's) the secret one
        self._ctx_bytes = self.public.context_bytes if _ctx is None else None
        self.clip = clip
        self.workers = workers

    def encrypt(self, vector: np.ndarray, *, session_id: bytes, client_id: int) -> bytes:
        """Return an envelope (msgpack) with one CKKS ciphertext per ``slots`` values."""
        x = np.asarray(vector, dtype=np.float64).ravel()
        if x.size == 0 or x.size > MAX_VALUES:
            raise ConfigError(f"HE client {client_id}: vector has {x.size} values; need 1..{MAX_VALUES}")
        if not np.all(np.isfinite(x)):
            raise ConfigError(f"HE client {client_id}: vector has NaN/inf values; clip or fix the update")
        bound = self.clip if self.clip is not None else self.params.max_abs_value
        if np.max(np.abs(x)) > bound:
            raise ConfigError(
                f"HE client {client_id}: max |value| {np.max(np.abs(x)):g} exceeds the clip {bound:g}; "
                "clip the update first (secagg.he.clip)"
            )
        slots = self.params.slots
        chunks = [x[i : i + slots] for i in range(0, x.size, slots)]
        pool = he_workers.shared_workers(self.workers or he_workers.default_workers()) if len(chunks) > 1 else None
        if pool is None:
            cts = he_workers.encrypt_chunks(self._ctx, chunks)
        else:
            if self._ctx_bytes is None:
                self._ctx_bytes = self._ctx.serialize(save_secret_key=True)
            cts = pool.encrypt(self._ctx, self._ctx_bytes, self.params, chunks)
        return msgpack.packb(
            {"v": WIRE_VERSION, "ctx": self.public.fingerprint, "sid": _session_tag(session_id),
             "cid": int(client_id), "n": int(x.size), "cts": cts},
            use_bin_type=True,
        )


# ----------------------------------------------------------------------------- server


class ServerAggregatorHE:
    """Adds clients' ciphertexts; holds only the public context and its own Ed25519 signing key."""

    def __init__(self, public_descriptor: bytes, *, signing_key: Ed25519PrivateKey | None = None) -> None:
        """Parse the public descriptor (``SecurityError`` if it carries a secret key)."""
        self.public = PublicContext.parse(public_descriptor)
        self.params = self.public.params
        self._ctx = _load_context(self.public.context_bytes, self.params)
        self._signing_key = signing_key or Ed25519PrivateKey.generate()
        self._round: dict | None = None

    @property
    def has_secret_key(self) -> bool:
        """True iff the server's context holds a secret key (never, by construction)."""
        return bool(self._ctx.is_private() or self._ctx.has_secret_key())

    def serialized_context(self) -> bytes:
        """Everything the server could serialise of its context (for audits and tests)."""
        return self._ctx.serialize(save_public_key=True, save_secret_key=True)

    def public_key_bytes(self) -> bytes:
        """Raw Ed25519 public key that key holders pin at enrolment."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return self._signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def start_round(self, session_id: bytes, n_values: int) -> None:
        """Open a round expecting vectors of ``n_values`` values."""
        if not 1 <= int(n_values) <= MAX_VALUES:
            raise ConfigError(f"HE server: n_values {n_values} outside 1..{MAX_VALUES}")
        self._round = {"sid": bytes(session_id), "n": int(n_values), "sum": None, "weights": {},
                       "digests": {}, "bytes": 0}

    def submit(self, client_id: int, envelope: bytes, weight: int = 1) -> None:
        """Check an envelope and add ``weight`` x its ciphertexts into the running sum.

        Refuses (``SecurityError``): no open round, a duplicate client, a client id that differs
        from the header, a foreign context, another round, a wrong length, truncated/foreign
        ciphertexts, or a weight outside 1..MAX_WEIGHT.
        """
        r = self._round
        if r is None:
            raise SecurityError("HE server: submit() before start_round()")
        cid = int(client_id)
        if cid in r["weights"]:
            raise SecurityError(f"HE server: client {cid} already contributed this round")
        if not isinstance(weight, (int, np.integer)) or not 1 <= int(weight) <= MAX_WEIGHT:
            raise ConfigError(f"HE server: weight {weight!r} for client {cid} must be an integer in 1..{MAX_WEIGHT}")
        what = f"HE envelope from client {cid}"
        env = _parse_envelope(envelope, self.params, self.public.fingerprint, _session_tag(r["sid"]), what)
        if int(env.get("cid", -1)) != cid:
            raise SecurityError(f"{what}: header names client {env.get('cid')}")
        if env["n"] != r["n"]:
            raise SecurityError(f"{what}: {env['n']} values, the round expects {r['n']}")
        sizes = _chunk_sizes(r["n"], self.params.slots)
        vecs = [_ckks_from(self._ctx, blob, self.params, s, what) for blob, s in zip(env["cts"], sizes)]
        weighted = [_times_int(v, int(weight)) for v in vecs]
        if r["sum"] is None:
            r["sum"] = weighted
        else:
            for acc, v in zip(r["sum"], weighted):
                acc.add_(v)
        r["weights"][cid] = int(weight)
        r["digests"][cid] = hashlib.sha256(envelope).hexdigest()
        r["bytes"] += len(envelope)

    def finish(self, threshold: int) -> tuple[bytes, bytes, bytes]:
        """Close the round: ``(aggregate envelope, statement JSON, Ed25519 signature)``.

        Raises ``ProtocolAbort`` when fewer than ``threshold`` clients contributed.
        """
        r = self._round
        if r is None or r["sum"] is None or len(r["weights"]) < threshold:
            got = 0 if r is None else len(r["weights"])
            raise ProtocolAbort(f"HE server: only {got} contributions, threshold is {threshold}: round aborted")
        agg = msgpack.packb(
            {"v": WIRE_VERSION, "ctx": self.public.fingerprint, "sid": _session_tag(r["sid"]), "cid": -1,
             "n": r["n"], "cts": [v.serialize() for v in r["sum"]]},
            use_bin_type=True,
        )
        statement = json.dumps(
            {"v": WIRE_VERSION, "session": _session_tag(r["sid"]).hex(), "context": self.public.fingerprint.hex(),
             "contributors": sorted(r["weights"]), "weights": {str(k): w for k, w in sorted(r["weights"].items())},
             "weight_total": sum(r["weights"].values()), "n": r["n"],
             "contribution_sha256": {str(k): d for k, d in sorted(r["digests"].items())},
             "aggregate_sha256": hashlib.sha256(agg).hexdigest()},
            sort_keys=True, separators=(",", ":"),
        ).encode()
        self._round = None
        return agg, statement, self._signing_key.sign(statement)


def _times_int(vec: ts.CKKSVector, k: int) -> ts.CKKSVector:
    """``k * vec`` by double-and-add (additions only: no scale growth, error grows by ``k``)."""
    if k == 1:
        return vec
    result, base = None, vec
    while k:
        if k & 1:
            result = base.copy() if result is None else result + base
        k >>= 1
        if k:
            base = base + base
    return result


# ----------------------------------------------------------------------------- in-process summer


class CKKSSummer:
    """:class:`SecureSummer` over CKKS: key holder(s), clients and server in one process.

    Options: CKKS parameters (``poly_modulus_degree``, ``coeff_mod_bit_sizes``, ``scale_bits``,
    ``encryption`` = ``public`` | ``symmetric``), ``clip`` (bound on every |value|),
    ``tolerance`` (the absolute error per aggregate value the caller accepts; configurations that
    cannot meet it are refused), ``key_holders`` (how many of the lowest client ids hold the key),
    ``rotate`` (``federation``: one key set for this object; ``round``: fresh keys every call),
    ``stat_security`` / ``max_decryptions`` / ``flood`` (see :class:`FloodingPolicy`).
    """

    mode = "he"

    def __init__(
        self,
        *,
        poly_modulus_degree: int = 8192,
        coeff_mod_bit_sizes: tuple[int, ...] | list[int] = (60, 40),
        scale_bits: int = 40,
        encryption: str = "public",
        clip: float = 1024.0,
        tolerance: float = 1e-2,
        key_holders: int = 1,
        rotate: str = "federation",
        stat_security: int = 30,
        max_decryptions: int = 100,
        flood: bool = True,
    ) -> None:
        """Validate every option now (``ConfigError`` naming the field)."""
        self.params = validate_params(poly_modulus_degree, coeff_mod_bit_sizes, scale_bits, encryption)
        if rotate not in ("federation", "round"):
            raise ConfigError(f"secagg.he.rotate: {rotate!r}; use 'federation' or 'round'")
        if int(key_holders) < 1:
            raise ConfigError("secagg.he.key_holders: need at least one key holder")
        if int(stat_security) < 1 or int(max_decryptions) < 1:
            raise ConfigError("secagg.he.stat_security and max_decryptions must be >= 1")
        self.clip, self.tolerance = float(clip), float(tolerance)
        self.key_holders, self.rotate = int(key_holders), rotate
        self.flooding = FloodingPolicy(int(stat_security), int(max_decryptions), bool(flood))
        self._server_key = Ed25519PrivateKey.generate()
        self._keyholder: KeyHolder | None = None

    def stated_tolerance(self, weight_total: int) -> float:
        """Absolute per-value error bound of the aggregate for total weight ``weight_total``."""
        return self.flooding.tolerance(self.params, weight_total)

    def _check(self, weight_total: int) -> None:
        check_capacity(self.params, self.clip, weight_total, self.tolerance)
        stated = self.stated_tolerance(weight_total)
        if stated > self.tolerance:
            raise ConfigError(
                f"secagg.he.tolerance: the stated error {stated:.3g} (CKKS error + flooding for total "
                f"weight {weight_total}) exceeds the tolerance {self.tolerance:g}; raise scale_bits, "
                "lower max_decryptions (rotate keys more often) or accept a larger tolerance"
            )

    def secure_sum(
        self,
        vectors: Mapping[int, np.ndarray],
        *,
        threshold: int,
        session_id: bytes,
        dropouts: DropoutPlan | None = None,
    ) -> SecureSumResult:
        """Sum over clients not dropped before ``masked_input``; ``ProtocolAbort`` below threshold."""
        return self.secure_weighted_sum(vectors, None, threshold=threshold, session_id=session_id, dropouts=dropouts)

    def secure_weighted_sum(
        self,
        vectors: Mapping[int, np.ndarray],
        weights: Mapping[int, int] | None,
        *,
        threshold: int,
        session_id: bytes,
        dropouts: DropoutPlan | None = None,
    ) -> SecureSumResult:
        """``sum_i w_i x_i`` over survivors with integer weights ``w_i`` in 1..MAX_WEIGHT.

        The aggregator divides by ``stats['weight_total']`` itself for a weighted mean.
        """
        t0 = time.perf_counter()
        if not vectors:
            raise ProtocolAbort("HE: no client vectors: round aborted")
        dropouts = dropouts or DropoutPlan()
        ids = sorted(int(i) for i in vectors)
        dropped = dropouts.dropped_by("masked_input")
        survivors = tuple(i for i in ids if i not in dropped)
        if len(survivors) < threshold:
            raise ProtocolAbort(f"only {len(survivors)} clients survived, threshold is {threshold}: round aborted")
        w = {i: int((weights or {}).get(i, 1)) for i in survivors}
        weight_total = sum(w.values())
        self._check(weight_total)

        # symmetric encryption: every client encrypts with the shared secret key, so all hold it
        holder_ids = ids if self.params.encryption == "symmetric" else ids[: self.key_holders]
        alive_holders = [i for i in holder_ids if i not in dropouts.dropped_by("unmask")]
        if not alive_holders:
            raise ProtocolAbort(f"HE: every key holder {holder_ids} dropped before decryption: round aborted")
        if self._keyholder is None or self.rotate == "round":
            self._keyholder = KeyHolder(self.params, flooding=self.flooding)  # fresh keys
        keyholder = self._keyholder
        server = ServerAggregatorHE(keyholder.public_descriptor(), signing_key=self._server_key)
        keyholder.server_public_key = server.public_key_bytes()  # pinned at enrolment

        shared = keyholder.encryptor()  # key holders (and all clients in symmetric mode)
        public_enc = None if self.params.encryption == "symmetric" else ClientEncryptor(
            keyholder.public_descriptor(), clip=self.clip
        )
        n = int(np.asarray(vectors[survivors[0]]).size)
        server.start_round(session_id, n)
        t_enc = 0.0
        for i in survivors:
            enc = shared if (i in holder_ids or public_enc is None) else public_enc
            enc.clip = self.clip
            t1 = time.perf_counter()
            env = enc.encrypt(vectors[i], session_id=session_id, client_id=i)
            t_enc += time.perf_counter() - t1
            server.submit(i, env, w[i])
        envelope_bytes = server._round["bytes"]  # noqa: SLF001 - in-process accounting only
        agg, statement, sig = server.finish(threshold)
        total = keyholder.decrypt_aggregate(
            agg, statement, sig, session_id=session_id, threshold=threshold, enrolled=frozenset(ids)
        )
        stats = {
            "bytes_per_client": envelope_bytes / len(survivors),
            "bytes_per_value": envelope_bytes / len(survivors) / n,
            "ciphertexts_per_client": len(_chunk_sizes(n, self.params.slots)),
            "aggregate_bytes": len(agg),
            "weight_total": weight_total,
            "tolerance": self.stated_tolerance(weight_total),
            "flood_sigma": self.flooding.sigma(self.params, weight_total),
            "key_holder": alive_holders[0],
            "encrypt_seconds": t_enc,
            "seconds": time.perf_counter() - t0,
            "params": self.params.to_json(),
        }
        return SecureSumResult(total, survivors, self.mode, stats)
