"""Masking mode: secure aggregation by pairwise + self masks with dropout recovery.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS'17),
with the optional SecAgg+ sparse neighbour graph (Bell et al., CCS'20). Pure protocol objects: a
:class:`ClientProtocol` and a :class:`ServerProtocol` exchange the typed messages of
``messages.py``; a network layer only carries them. :class:`MaskingSummer` drives N clients and
the server in-process (simulation, tests, benchmark).

Rounds (server side: ``receive`` every message of a round, then ``advance`` at the deadline):
  0 advertise keys   client: AdvertiseKeys (two fresh X25519 keys)  -> server: KeyBroadcast (U1)
  1 share keys       client: ShareKeys (Shamir shares of b_u and s_u^SK, AEAD per peer)
                                                                     -> server: ShareBroadcast (U2)
  2 masked input     client: MaskedInput y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv)
                                                                     -> server: ConsistencyCheck (U3)
  3 consistency      client: ConsistencyAck (Ed25519 signature of U3 if it has an identity key)
                                                                     -> server: UnmaskRequest (U4)
  4 unmasking        client: UnmaskResponse (b-shares of U3, sk-shares of U2 \\ U3)
                                                                     -> server: sum over U3
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedproxy_secure.errors import ConfigError, ProtocolAbort
from fedproxy_secure.wire.binding import graph_seed, length_prefixed
from fedproxy_secure.wire.threshold import neighbourhood_threshold, secagg_plus_degree
from fedproxy_secure.secagg import messages as M
from fedproxy_secure.secagg.base import STAGES, DropoutPlan, SecureSumResult
from fedproxy_secure.secagg.idset import decode_ids, encode_ids
from fedproxy_secure.secagg.encoding import FixedPointEncoder
from fedproxy_secure.secagg.prg import (
    DOMAIN,
    INFO_GRAPH,
    INFO_SHARE_AEAD,
    MaskExpander,
    expand,
    hkdf,
    ids_info,
    pairwise_key,
    self_mask_key,
)
from fedproxy_secure.secagg.shamir import SHARE_BYTES, combine_shares, split_secret

KEY_BYTES = 32
MIN_SESSION_ID_BYTES = 16
_SIG_ADVERTISE = DOMAIN + b"secagg-advertise"
_SIG_CONSISTENCY = DOMAIN + b"secagg-consistency"


def derive_session_id(federation_id: str, round_id: int, nonce: bytes = b"") -> bytes:
    """32-byte session id binding federation, round and an optional server nonce (SHA-256)."""
    h = hashlib.sha256(DOMAIN + b"session")
    for part in (federation_id.encode(), int(round_id).to_bytes(8, "big"), nonce):
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class MaskingConfig:
    """Public parameters of one session, identical at the server and every client.

    ``threshold`` (t): minimum number of clients at every stage; also the Shamir threshold of each
    client's secrets on the complete graph. ``neighbours``: SecAgg+ degree k (odd k is rounded up
    to even); None = automatic: the complete graph for cohorts of at most ``SPARSE_CUTOFF``
    clients, above it the degree of ``wire.threshold.secagg_plus_degree`` (about 2*log2 n plus
    a margin); ``complete_graph=True`` forces the complete graph at any size. With a sparse graph,
    each client's secrets are shared among its k neighbours plus itself with threshold
    ``neighbour_threshold`` (default ``wire.threshold.neighbourhood_threshold``: a strict
    majority of the k + 1 holders).
    """

    threshold: int
    vector_length: int
    encoder: FixedPointEncoder = field(default_factory=FixedPointEncoder)
    neighbours: int | None = None
    neighbour_threshold: int | None = None
    complete_graph: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, int) or self.threshold < 2:
            raise ConfigError(f"secagg.threshold: {self.threshold!r} must be an int >= 2")
        if not isinstance(self.vector_length, int) or self.vector_length < 1:
            raise ConfigError(f"secagg vector_length: {self.vector_length!r} must be a positive int")
        if self.neighbours is not None and (not isinstance(self.neighbours, int) or self.neighbours < 2):
            raise ConfigError(f"secagg.neighbours: {self.neighbours!r} must be None or an int >= 2")
        if self.neighbour_threshold is not None and self.neighbours is None:
            raise ConfigError("secagg.neighbour_threshold: only meaningful with secagg.neighbours")
        if self.complete_graph and self.neighbours is not None:
            raise ConfigError("secagg.complete_graph: set either complete_graph or neighbours, not both")

    def degree(self, n: int) -> int | None:
        """SecAgg+ degree used for a cohort of ``n`` clients (None: complete graph)."""
        if self.complete_graph:
            return None
        if self.neighbours is None:
            return secagg_plus_degree(n)
        return self.neighbours

    def graph(self, session_id: bytes, ids: Iterable[int]) -> dict[int, frozenset[int]]:
        """Neighbours of each id: complete graph, or a random Harary graph keyed by the session."""
        ids = sorted(ids)
        n = len(ids)
        k = self.degree(n)
        half = None if k is None else (k + 1) // 2
        if half is None or 2 * half >= n - 1:
            everyone = frozenset(ids)
            return {u: everyone - {u} for u in ids}
        order = _graph_order(session_id, ids)
        pos = {u: p for p, u in enumerate(order)}
        return {
            u: frozenset(order[(pos[u] + d) % n] for d in range(-half, half + 1) if d != 0) for u in ids
        }

    def neighbours_of(self, session_id: bytes, ids: Iterable[int], u: int) -> frozenset[int]:
        """``graph(session_id, ids)[u]`` without building the other clients' neighbourhoods.

        O(n log n) for the keyed order and O(k) for the slice, instead of O(n k) for the whole graph.
        """
        ids = sorted(ids)
        n = len(ids)
        k = self.degree(n)
        half = None if k is None else (k + 1) // 2
        if half is None or 2 * half >= n - 1:
            return frozenset(ids) - {u}
        order = _graph_order(session_id, ids)
        p = order.index(u)
        return frozenset(order[(p + d) % n] for d in range(-half, half + 1) if d != 0)

    def share_threshold(self, n_holders: int, complete: bool) -> int:
        """Shamir threshold of one client's secrets given its number of holders (itself included)."""
        if complete:
            return self.threshold
        if self.neighbour_threshold is not None:
            return self.neighbour_threshold
        return neighbourhood_threshold(n_holders - 1)


def check_graph(graph: Mapping[int, frozenset[int]]) -> None:
    """Refuse a neighbour graph that is not symmetric, has self loops, unknown ids or unequal degrees.

    Raises ``ProtocolAbort`` naming the first offending client; returns None for a k-regular
    undirected graph over exactly the mapping's keys (the only graphs :meth:`MaskingConfig.graph`
    makes, so any other graph means tampering or a bug).
    """
    ids = set(graph)
    degrees = {len(nb) for nb in graph.values()}
    if len(degrees) > 1:
        raise ProtocolAbort(f"secagg graph: degrees {sorted(degrees)} differ (must be k-regular)")
    for u, nb in graph.items():
        if u in nb:
            raise ProtocolAbort(f"secagg graph: client {u} is its own neighbour")
        if not nb <= ids:
            raise ProtocolAbort(f"secagg graph: client {u} has unknown neighbours {sorted(nb - ids)}")
        for v in nb:
            if u not in graph[v]:
                raise ProtocolAbort(f"secagg graph: edge {u}-{v} is not symmetric")


def _graph_order(session_id: bytes, ids: list[int]) -> list[int]:
    """The sorted ids permuted by a session-keyed ChaCha20 stream: the SecAgg+ ring order.

    Every party derives the same order from the session id and U1 (``ids`` sorted): the i-th id
    gets the i-th 64-bit value of the keystream and the ids are ordered by those values (stable
    sort, so ties are deterministic). Without the session id the order is unpredictable. One
    keystream and one argsort instead of n PRF calls per client.
    """
    key = hkdf(b"graph", session_id, INFO_GRAPH)
    ranks = np.argsort(expand(key, len(ids)), kind="stable")
    return [ids[i] for i in ranks.tolist()]


#: values per block when masks are streamed (256 KiB of uint64: keystream and sum stay in cache)
MASK_BLOCK = 1 << 15
_ZERO_NONCE = bytes(16)  # the nonce of prg.MaskExpander: each key makes exactly one stream


def add_masks_streamed(
    acc: np.ndarray,
    keys: list[tuple[bytes, int]],
    fill: Callable[[slice], None] | None = None,
    block: int = MASK_BLOCK,
) -> float:
    """``acc += sum(sign * PRG(key))`` modulo 2^64, block by block; returns the seconds ``fill`` took.

    Guarantees: the result equals calling ``prg.MaskExpander.add_into(acc, key, sign)`` for every
    ``(key, sign)`` (same ChaCha20 keystream, zero nonce), but each keystream block is added while it
    is still in cache. ``fill(slice)``, if given, writes ``acc[slice]`` first (e.g. the encoded
    input), so encoding and masking also run in one pass.
    """
    n = acc.shape[0]
    encs = [(Cipher(algorithms.ChaCha20(k, _ZERO_NONCE), mode=None).encryptor(), sign) for k, sign in keys]
    zeros = memoryview(bytes(8 * block))
    buf = bytearray(8 * block + 64)
    fill_s = 0.0
    for start in range(0, n, block):
        m = min(block, n - start)
        seg = acc[start:start + m]
        if fill is not None:
            t0 = time.perf_counter()
            fill(slice(start, start + m))
            fill_s += time.perf_counter() - t0
        for enc, sign in encs:
            enc.update_into(zeros[:8 * m], buf)
            v = np.frombuffer(buf, dtype=np.uint64, count=m)
            if sign > 0:
                np.add(seg, v, out=seg)
            else:
                np.subtract(seg, v, out=seg)
    return fill_s


def _mask_sign(me: int, peer: int) -> int:
    """+1 if ``me < peer`` else -1: the pair's two masks cancel in the sum."""
    return 1 if me < peer else -1


def _sign_payload(label: bytes, session_id: bytes, *parts: bytes) -> bytes:
    return label + len(session_id).to_bytes(4, "big") + session_id + b"".join(parts)


def _advertise_payload(session_id: bytes, context: bytes, k: M.PeerKeys) -> bytes:
    """What a client signs over its advertised keys: the session, the round's binding context (the
    signed round config's digest, :mod:`fedproxy_secure.wire.binding`), its id, both keys and
    its revealed graph nonce."""
    return _sign_payload(_SIG_ADVERTISE, session_id, length_prefixed(context), k.client_id.to_bytes(8, "big"),
                         k.enc_pk, k.mask_pk, length_prefixed(k.graph_nonce))


def _consistency_payload(session_id: bytes, context: bytes, u3: Iterable[int]) -> bytes:
    """What a client signs in the consistency round: the session, the binding context and U3."""
    return _sign_payload(_SIG_CONSISTENCY, session_id, length_prefixed(context), _ids_bytes(u3))


def session_graph_key(session_id: bytes, graph_commits: Mapping[int, bytes] | None,
                      keys: Iterable[M.PeerKeys] | Mapping[int, bytes]) -> bytes | None:
    """The key of this session's SecAgg+ graph, or None for the complete graph.

    ``graph_commits`` None (in-process simulation, honest-but-curious server only): the session id,
    as before. Otherwise commit-reveal (:func:`fedproxy_secure.wire.binding.graph_seed`): a
    seed over every committed member's revealed nonce, or None (complete graph) if U1 is not
    exactly the committed set or any nonce fails to open its commitment. Pure: the server and every
    client compute the same from the same U1.
    """
    if graph_commits is None:
        return session_id
    reveals = dict(keys) if isinstance(keys, Mapping) else {k.client_id: k.graph_nonce for k in keys}
    return graph_seed(session_id, graph_commits, reveals)


#: bytes of one graph nonce in a compact KeyBroadcast's ``nonces`` (wire.binding.NONCE_BYTES)
_NONCE_BYTES = 32


def key_broadcasts(session_id: bytes, u1: tuple[int, ...], keys: Mapping[int, M.PeerKeys],
                   graph: Mapping[int, frozenset[int]], with_nonces: bool) -> dict[int, M.KeyBroadcast]:
    """Round-1 messages: on the complete graph every key to everyone (as before); on a SecAgg+ graph
    each client gets only its own and its k neighbours' keys, U1 as a compact id set and, with a
    commit-reveal graph seed (``with_nonces``), every member's nonce so it can check the seed.

    Guarantees: O(n k) keys in all instead of O(n^2); one shared encoding of U1 and of the nonces.
    """
    everyone = tuple(keys[u] for u in u1)
    if all(len(graph[u]) == len(u1) - 1 for u in u1):
        return {u: M.KeyBroadcast(session_id, u, everyone) for u in u1}
    members = encode_ids(u1)
    nonces = b"".join(keys[u].graph_nonce for u in u1) if with_nonces else b""
    return {u: M.KeyBroadcast(session_id, u, tuple(keys[v] for v in sorted(graph[u] | {u})), members, nonces)
            for u in u1}


def _complete(ids: Iterable[int]) -> dict[int, frozenset[int]]:
    everyone = frozenset(ids)
    return {u: everyone - {u} for u in everyone}


def _ids_bytes(ids: Iterable[int]) -> bytes:
    return b"".join(int(i).to_bytes(8, "big") for i in sorted(ids))


def _aead_key(my_sk: X25519PrivateKey, peer_pk: bytes, session_id: bytes, a: int, b: int) -> bytes:
    shared = my_sk.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    lo, hi = sorted((a, b))
    return hkdf(shared, session_id, ids_info(INFO_SHARE_AEAD, lo, hi))


class ClientState(enum.Enum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


class ServerState(enum.Enum):
    COLLECT_KEYS = "collect_keys"
    COLLECT_SHARES = "collect_shares"
    COLLECT_MASKED = "collect_masked"
    COLLECT_ACKS = "collect_acks"
    COLLECT_UNMASK = "collect_unmask"
    DONE = "done"
    ABORTED = "aborted"


# =========================================================================== client
class ClientProtocol:
    """One client's state machine. Every ``on_*`` method validates the server message fully and
    either returns the reply or aborts (state ``ABORTED``, secrets wiped, ``ProtocolAbort``).

    ``used_sessions``: a set the client persists across rounds; a session id already in it is
    refused (replay), and this session's id is added to it on construction.
    ``identity_key`` / ``peer_identities``: optional Ed25519 keys from enrolment; when
    ``peer_identities`` is given, every advertised key and the consistency round must be signed.
    ``context``: the round's binding context (the signed round config's digest, see
    :mod:`fedproxy_secure.wire.binding`), signed into the advertised keys and the consistency
    ack and checked in every peer's: peers given another config make this client abort before its
    masked input leaves. ``graph_commits`` / ``graph_nonce``: the cohort's commitments from the
    signed config and this client's own nonce (commit-reveal graph seed; None: session-keyed graph,
    in-process simulation only).
    """

    def __init__(
        self,
        client_id: int,
        session_id: bytes,
        config: MaskingConfig,
        vector: np.ndarray,
        *,
        used_sessions: set[bytes] | None = None,
        identity_key: Ed25519PrivateKey | None = None,
        peer_identities: Mapping[int, Ed25519PublicKey] | None = None,
        context: bytes = b"",
        graph_commits: Mapping[int, bytes] | None = None,
        graph_nonce: bytes = b"",
    ) -> None:
        if not isinstance(client_id, int) or not 0 < client_id <= M.MAX_ID:
            raise ConfigError(f"secagg client_id: {client_id!r} must be a positive int")
        if not isinstance(session_id, bytes) or len(session_id) < MIN_SESSION_ID_BYTES:
            raise ConfigError(f"secagg session_id: must be at least {MIN_SESSION_ID_BYTES} bytes")
        if used_sessions is not None:
            if session_id in used_sessions:
                raise ProtocolAbort(f"client {client_id}: session id was already used (replay)")
            used_sessions.add(session_id)
        vector = np.asarray(vector)
        if vector.shape != (config.vector_length,):
            raise ConfigError(f"secagg input: shape {vector.shape} != ({config.vector_length},)")
        self.id = client_id
        self.session_id = session_id
        self.config = config
        self._x = vector
        self._identity = identity_key
        self._peer_ids = dict(peer_identities) if peer_identities is not None else None
        self._context = bytes(context)
        self._graph_commits = dict(graph_commits) if graph_commits is not None else None
        self._graph_nonce = bytes(graph_nonce)
        self.graph_sparse = False  # True once a sparse (SecAgg+) graph was fixed for this session
        self.state = ClientState.ADVERTISE
        self.timings: dict[str, float] = {}
        # secrets (wiped on abort / done)
        self._enc_sk = X25519PrivateKey.generate()
        self._mask_sk = X25519PrivateKey.generate()
        self._seed = os.urandom(KEY_BYTES)
        self._peers: dict[int, M.PeerKeys] = {}  # own and neighbours' keys
        self._u1: frozenset[int] = frozenset()
        self._neighbours: frozenset[int] = frozenset()
        self._holders_t = 0
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner -> (b-share, sk-share) I hold
        self._aead_keys: dict[int, bytes] = {}  # neighbour -> share-transport key of the pair
        self._u2: frozenset[int] = frozenset()
        self._u3: tuple[int, ...] = ()

    @property
    def neighbours(self) -> frozenset[int]:
        """The peers this client shares its secrets with (fixed at the key broadcast; empty before)."""
        return self._neighbours

    @property
    def holders_threshold(self) -> int:
        """Shares needed to rebuild this client's secrets (0 before the key broadcast)."""
        return self._holders_t

    # ------------------------------------------------------------------ helpers
    def _abort(self, why: str) -> ProtocolAbort:
        self.state = ClientState.ABORTED
        self._enc_sk = self._mask_sk = None  # type: ignore[assignment]
        self._seed = b""
        self._held.clear()
        self._aead_keys.clear()
        return ProtocolAbort(f"client {self.id}: {why}")

    def _expect(self, state: ClientState, msg: object, cls: type) -> None:
        if self.state is ClientState.ABORTED:
            raise ProtocolAbort(f"client {self.id}: already aborted")
        if not isinstance(msg, cls):
            raise self._abort(f"expected {cls.__name__}, got {type(msg).__name__}")
        if self.state is not state:
            raise self._abort(f"{cls.__name__} received in state {self.state.value} (replay or out of order)")
        sid = getattr(msg, "session_id", None)
        if not isinstance(sid, bytes) or not hmac.compare_digest(sid, self.session_id):
            raise self._abort("message carries another session id (replayed or foreign round)")
        if getattr(msg, "recipient", self.id) != self.id:
            raise self._abort("message addressed to another client")

    def _check_ids(self, ids: Iterable[int], what: str, universe: Iterable[int] | None = None) -> tuple[int, ...]:
        ids = tuple(ids)
        bad = [i for i in ids if type(i) is not int or not 0 < i <= M.MAX_ID]  # bool is not int here
        if bad:
            raise self._abort(f"{what}: invalid client id {bad[0]!r}")
        as_set = set(ids)
        if len(as_set) != len(ids):
            raise self._abort(f"{what}: duplicated client id")
        if universe is not None:
            unknown = as_set.difference(universe)
            if unknown:
                raise self._abort(f"{what}: unknown client ids {sorted(unknown)}")
        return ids

    def handle(self, msg: object):
        """Dispatch a server message to the handler of the current round; returns the reply."""
        handler = {
            M.KeyBroadcast: self.on_key_broadcast,
            M.ShareBroadcast: self.on_share_broadcast,
            M.ConsistencyCheck: self.on_consistency_check,
            M.UnmaskRequest: self.on_unmask_request,
        }.get(type(msg))
        if handler is None:
            raise self._abort(f"unexpected message {type(msg).__name__}")
        return handler(msg)

    # ------------------------------------------------------------------ round 0
    def advertise(self) -> M.AdvertiseKeys:
        """Round 0: publish two fresh X25519 public keys (signed if the client has an identity key)."""
        if self.state is not ClientState.ADVERTISE:
            raise self._abort("advertise called twice")
        enc_pk = self._enc_sk.public_key().public_bytes_raw()
        mask_pk = self._mask_sk.public_key().public_bytes_raw()
        unsigned = M.PeerKeys(self.id, enc_pk, mask_pk, b"", self._graph_nonce)
        sig = b""
        if self._identity is not None:
            sig = self._identity.sign(_advertise_payload(self.session_id, self._context, unsigned))
        self._own_keys = M.PeerKeys(self.id, enc_pk, mask_pk, sig, self._graph_nonce)
        self.state = ClientState.SHARE_KEYS
        return M.AdvertiseKeys(self.session_id, self._own_keys)

    # ------------------------------------------------------------------ round 1
    def on_key_broadcast(self, msg: M.KeyBroadcast) -> M.ShareKeys:
        """Round 1: check U1, then Shamir-share b_u and s_u^SK and encrypt one share pair per peer."""
        t0 = time.perf_counter()
        self._expect(ClientState.SHARE_KEYS, msg, M.KeyBroadcast)
        ids = self._check_ids([k.client_id for k in msg.keys], "key broadcast")
        peers = {k.client_id: k for k in msg.keys}
        u1 = ids
        if msg.members:  # SecAgg+ form: U1 as a compact set, keys of this client's neighbourhood only
            try:
                members = decode_ids(msg.members, "key broadcast members", self.config.encoder.max_clients)
                u1 = self._check_ids(members, "key broadcast")
            except ProtocolAbort as exc:
                raise self._abort(str(exc)) from None
            if not set(ids) <= set(u1):
                raise self._abort("key broadcast carries keys of clients outside U1")
        elif msg.nonces:
            raise self._abort("key broadcast carries graph nonces without the member set")
        if peers.get(self.id) != self._own_keys:
            raise self._abort("key broadcast omits or alters this client's own keys")
        wrong = [k.client_id for k in msg.keys if len(k.enc_pk) != KEY_BYTES or len(k.mask_pk) != KEY_BYTES]
        if wrong:
            raise self._abort(f"client {wrong[0]}: public keys must be {KEY_BYTES} bytes")
        all_keys = [pk for k in msg.keys for pk in (k.enc_pk, k.mask_pk)]
        if len(set(all_keys)) != len(all_keys):
            seen_keys: set[bytes] = set()
            for k in msg.keys:
                if k.enc_pk in seen_keys or k.mask_pk in seen_keys or k.enc_pk == k.mask_pk:
                    raise self._abort(f"client {k.client_id}: public key reused")
                seen_keys |= {k.enc_pk, k.mask_pk}
        if self._peer_ids is not None:
            for k in msg.keys:
                self._verify_advertise(k)
        if len(u1) < self.config.threshold:
            raise self._abort(f"only {len(u1)} clients in U1, threshold is {self.config.threshold}")
        self.config.encoder.check_cohort(len(u1))
        self._peers = peers
        self._u1 = frozenset(u1)
        if msg.members and msg.nonces:
            if len(msg.nonces) != _NONCE_BYTES * len(u1):
                raise self._abort("key broadcast: graph nonces do not match the member set")
            reveals = {u: msg.nonces[_NONCE_BYTES * i:_NONCE_BYTES * (i + 1)] for i, u in enumerate(sorted(u1))}
            if any(not hmac.compare_digest(reveals[u], peers[u].graph_nonce) for u in ids):
                raise self._abort("key broadcast: a member's graph nonce differs from its signed advertised keys")
            gkey = session_graph_key(self.session_id, self._graph_commits, reveals)
        elif msg.members:
            gkey = session_graph_key(self.session_id, self._graph_commits, {u: b"" for u in u1})
        else:
            gkey = session_graph_key(self.session_id, self._graph_commits, msg.keys)
        if gkey is None:
            self._neighbours = frozenset(u1) - {self.id}
        else:
            self._neighbours = self.config.neighbours_of(gkey, u1, self.id)
        if msg.members and set(ids) != self._neighbours | {self.id}:
            raise self._abort("key broadcast does not carry exactly this client's neighbours' keys")
        self.graph_sparse = len(self._neighbours) < len(u1) - 1
        complete = len(self._neighbours) == len(u1) - 1
        holders = sorted(self._neighbours | {self.id})
        self._holders_t = self.config.share_threshold(len(holders), complete)
        if len(holders) < self._holders_t:
            raise self._abort(f"only {len(holders)} share holders, threshold is {self._holders_t}")
        b_shares = split_secret(self._seed, self._holders_t, holders)
        sk_shares = split_secret(self._mask_sk.private_bytes_raw(), self._holders_t, holders)
        self._held[self.id] = (b_shares[self.id], sk_shares[self.id])
        cts = []
        for v in sorted(self._neighbours):
            key = self._aead_keys[v] = _aead_key(self._enc_sk, peers[v].enc_pk, self.session_id, self.id, v)
            nonce = os.urandom(12)
            head = self.id.to_bytes(8, "big") + v.to_bytes(8, "big")
            ct = ChaCha20Poly1305(key).encrypt(nonce, head + b_shares[v] + sk_shares[v], self.session_id + head)
            cts.append(M.Ciphertext(v, nonce + ct))
        self.state = ClientState.MASKED_INPUT
        self.timings["share"] = time.perf_counter() - t0
        return M.ShareKeys(self.session_id, self.id, tuple(cts))

    def _verify_advertise(self, k: M.PeerKeys) -> None:
        pub = self._peer_ids.get(k.client_id) if self._peer_ids else None
        if pub is None:
            raise self._abort(f"client {k.client_id} has no enrolled identity key")
        try:
            pub.verify(k.signature, _advertise_payload(self.session_id, self._context, k))
        except InvalidSignature:
            raise self._abort(f"client {k.client_id}: bad signature on advertised keys (a forged key, or this "
                              "peer was sent another round config than this site)") from None

    # ------------------------------------------------------------------ round 2
    def on_share_broadcast(self, msg: M.ShareBroadcast) -> M.MaskedInput:
        """Round 2: decrypt the shares addressed to me, fix U2, send my masked input."""
        t0 = time.perf_counter()
        self._expect(ClientState.MASKED_INPUT, msg, M.ShareBroadcast)
        senders = self._check_ids([c.peer_id for c in msg.ciphertexts], "share broadcast", self._neighbours)
        if len(senders) + 1 < self._holders_t:
            raise self._abort(f"only {len(senders)} peers sent shares, too few for the threshold")
        for c in msg.ciphertexts:
            u = c.peer_id
            key = self._aead_keys[u]  # the pair's key, derived when this client encrypted to u
            head = u.to_bytes(8, "big") + self.id.to_bytes(8, "big")
            if len(c.data) < 12 + 16:
                raise self._abort(f"ciphertext from {u} is truncated")
            try:
                pt = ChaCha20Poly1305(key).decrypt(c.data[:12], c.data[12:], self.session_id + head)
            except InvalidTag:
                raise self._abort(f"ciphertext from {u} fails authentication") from None
            if len(pt) != 16 + 2 * SHARE_BYTES or not hmac.compare_digest(pt[:16], head):
                raise self._abort(f"ciphertext from {u} has the wrong layout")
            self._held[u] = (pt[16:16 + SHARE_BYTES], pt[16 + SHARE_BYTES:])
        self._u2 = frozenset(senders) | {self.id}
        self._aead_keys.clear()
        t1 = time.perf_counter()
        keys = [(self_mask_key(self._seed, self.session_id, self.id), +1)]
        for v in sorted(senders):
            shared = self._mask_sk.exchange(X25519PublicKey.from_public_bytes(self._peers[v].mask_pk))
            keys.append((pairwise_key(shared, self.session_id, self.id, v), _mask_sign(self.id, v)))
        y = np.empty(self.config.vector_length, dtype=np.uint64)
        x, encode = self._x, self.config.encoder.encode

        def fill(sl: slice) -> None:
            y[sl] = encode(x[sl])

        encode_s = add_masks_streamed(y, keys, fill)
        t3 = time.perf_counter()
        self.timings.update(decrypt=t1 - t0, encode=encode_s, mask=t3 - t1 - encode_s)
        self.state = ClientState.CONSISTENCY
        return M.MaskedInput(self.session_id, self.id, y)

    # ------------------------------------------------------------------ round 3
    def on_consistency_check(self, msg: M.ConsistencyCheck) -> M.ConsistencyAck:
        """Round 3: check U3 (subset of U2 as I know it, includes me, >= t) and sign it."""
        self._expect(ClientState.CONSISTENCY, msg, M.ConsistencyCheck)
        u3 = self._check_ids(msg.survivors, "consistency check", self._u1)
        if self.id not in u3:
            raise self._abort("consistency check omits this client although it sent its input")
        stray = (set(u3) & self._neighbours) - self._u2
        if stray:
            raise self._abort(f"survivors {sorted(stray)} never sent me shares")
        if len(u3) < self.config.threshold:
            raise self._abort(f"only {len(u3)} survivors, threshold is {self.config.threshold}")
        self._u3 = tuple(sorted(u3))
        sig = b""
        if self._identity is not None:
            sig = self._identity.sign(_consistency_payload(self.session_id, self._context, self._u3))
        self.state = ClientState.UNMASK
        return M.ConsistencyAck(self.session_id, self.id, sig)

    # ------------------------------------------------------------------ round 4
    def on_unmask_request(self, msg: M.UnmaskRequest) -> M.UnmaskResponse:
        """Round 4: reveal b-shares of survivors and sk-shares of dropped peers, never both for one."""
        self._expect(ClientState.UNMASK, msg, M.UnmaskRequest)
        alive = self._check_ids(msg.survivors, "unmask survivors", self._u1)
        dropped = self._check_ids(msg.dropped, "unmask dropped", self._u1)
        both = set(alive) & set(dropped)
        if both:
            raise self._abort(f"clients {sorted(both)} listed both alive and dropped")
        if self.id in dropped:
            raise self._abort("this client is listed as dropped")
        if tuple(sorted(alive)) != self._u3:
            raise self._abort("survivor set differs from the one in the consistency check")
        mine = self._u2 - {self.id}
        unclassified = mine - set(alive) - set(dropped)
        if unclassified:
            raise self._abort(f"peers {sorted(unclassified)} are neither alive nor dropped")
        if (set(dropped) & self._neighbours) - self._u2:
            raise self._abort("asked for key shares of a peer that never shared with me")
        if self._peer_ids is not None:
            self._verify_consistency(msg.signatures)
        b_out = tuple(M.Share(u, self._held[u][0]) for u in sorted(set(alive) & set(self._held)))
        sk_out = tuple(M.Share(u, self._held[u][1]) for u in sorted(set(dropped) & set(self._held)))
        self.state = ClientState.DONE
        self._held.clear()
        self._seed = b""
        return M.UnmaskResponse(self.session_id, self.id, b_out, sk_out)

    def _verify_consistency(self, sigs: tuple[M.Signature, ...]) -> None:
        payload = _consistency_payload(self.session_id, self._context, self._u3)
        good: set[int] = set()
        for s in sigs:
            pub = self._peer_ids.get(s.client_id) if self._peer_ids else None
            if pub is None or s.client_id not in self._u3:
                raise self._abort(f"consistency signature from unexpected client {s.client_id}")
            try:
                pub.verify(s.signature, payload)
            except InvalidSignature:
                raise self._abort(f"bad consistency signature from client {s.client_id}") from None
            good.add(s.client_id)
        if len(good) < self.config.threshold:
            raise self._abort(f"only {len(good)} consistency signatures, threshold is {self.config.threshold}")


# =========================================================================== server
class ServerProtocol:
    """The server's state machine. For each round: call :meth:`receive` for every client message
    that arrives before the deadline, then :meth:`advance`, which closes the round and returns the
    messages to send (client id -> message). ``advance`` raises ``ProtocolAbort`` (state
    ``ABORTED``) when fewer than t clients remain. After the unmasking round :meth:`result` gives
    the encoded sum over U3. ``receive`` never raises for a client's bad or late message: it
    returns False and records why in ``rejected`` (that client then counts as dropped).
    """

    def __init__(
        self,
        session_id: bytes,
        config: MaskingConfig,
        *,
        peer_identities: Mapping[int, Ed25519PublicKey] | None = None,
        context: bytes = b"",
        graph_commits: Mapping[int, bytes] | None = None,
    ) -> None:
        if not isinstance(session_id, bytes) or len(session_id) < MIN_SESSION_ID_BYTES:
            raise ConfigError(f"secagg session_id: must be at least {MIN_SESSION_ID_BYTES} bytes")
        self.session_id = session_id
        self.config = config
        self._peer_ids = dict(peer_identities) if peer_identities is not None else None
        self._context = bytes(context)
        self._graph_commits = dict(graph_commits) if graph_commits is not None else None
        self.state = ServerState.COLLECT_KEYS
        self.rejected: list[tuple[int | None, str]] = []
        self.seconds = 0.0
        self._keys: dict[int, M.PeerKeys] = {}
        self._graph: dict[int, frozenset[int]] = {}
        self._shares: dict[int, M.ShareKeys] = {}
        self._sum = np.zeros(config.vector_length, dtype=np.uint64)
        self._masked: set[int] = set()
        self._acks: dict[int, bytes] = {}
        self._b_shares: dict[int, dict[int, bytes]] = {}
        self._sk_shares: dict[int, dict[int, bytes]] = {}
        self._responders: set[int] = set()
        self.u1: tuple[int, ...] = ()
        self.u2: tuple[int, ...] = ()
        self.u3: tuple[int, ...] = ()
        self.u4: tuple[int, ...] = ()
        self._result: np.ndarray | None = None

    # ------------------------------------------------------------------ receive
    def receive(self, msg: object) -> bool:
        """Accept one client message for the current round; False (and a reason) if refused."""
        t0 = time.perf_counter()
        try:
            why = self._receive(msg)
        finally:
            self.seconds += time.perf_counter() - t0
        if why:
            self.rejected.append((getattr(msg, "client_id", None), why))
            return False
        return True

    def _receive(self, msg: object) -> str | None:
        sid = getattr(msg, "session_id", None)
        if not isinstance(sid, bytes) or not hmac.compare_digest(sid, self.session_id):
            return "wrong session id"
        cid = msg.client_id  # type: ignore[attr-defined]
        expected = {
            ServerState.COLLECT_KEYS: (M.AdvertiseKeys, None),
            ServerState.COLLECT_SHARES: (M.ShareKeys, self.u1),
            ServerState.COLLECT_MASKED: (M.MaskedInput, self.u2),
            ServerState.COLLECT_ACKS: (M.ConsistencyAck, self.u3),
            ServerState.COLLECT_UNMASK: (M.UnmaskResponse, self.u4),
        }.get(self.state)
        if expected is None or not isinstance(msg, expected[0]):
            # e.g. a MaskedInput after U3 was fixed: the client is dropped, its vector is not used
            return f"late or unexpected {type(msg).__name__} in state {self.state.value}"
        if expected[1] is not None and cid not in expected[1]:
            return f"client {cid} is not in the current cohort (dropped or unknown)"
        if isinstance(msg, M.AdvertiseKeys):
            return self._on_advertise(msg)
        if isinstance(msg, M.ShareKeys):
            return self._on_share_keys(msg)
        if isinstance(msg, M.MaskedInput):
            return self._on_masked_input(msg)
        if isinstance(msg, M.ConsistencyAck):
            return self._on_ack(msg)
        return self._on_unmask_response(msg)  # type: ignore[arg-type]

    def _on_advertise(self, msg: M.AdvertiseKeys) -> str | None:
        k = msg.keys
        if k.client_id in self._keys:
            return "duplicate advertise"
        if len(k.enc_pk) != KEY_BYTES or len(k.mask_pk) != KEY_BYTES:
            return "public keys of the wrong size"
        if self._peer_ids is not None:
            pub = self._peer_ids.get(k.client_id)
            try:
                if pub is None:
                    return "no enrolled identity"
                pub.verify(k.signature, _advertise_payload(self.session_id, self._context, k))
            except InvalidSignature:
                return "bad signature"
        self._keys[k.client_id] = k
        return None

    def _on_share_keys(self, msg: M.ShareKeys) -> str | None:
        if msg.client_id in self._shares:
            return "duplicate share keys"
        targets = [c.peer_id for c in msg.ciphertexts]
        if len(set(targets)) != len(targets) or set(targets) != self._graph[msg.client_id]:
            return "ciphertexts do not address exactly the client's neighbours"
        self._shares[msg.client_id] = msg
        return None

    def _on_masked_input(self, msg: M.MaskedInput) -> str | None:
        if msg.client_id in self._masked:
            return "duplicate masked input"
        v = msg.vector
        if not isinstance(v, np.ndarray) or v.dtype != np.uint64 or v.shape != (self.config.vector_length,):
            return "masked input of the wrong dtype or length"
        np.add(self._sum, v, out=self._sum)
        self._masked.add(msg.client_id)
        return None

    def _on_ack(self, msg: M.ConsistencyAck) -> str | None:
        if msg.client_id in self._acks:
            return "duplicate consistency ack"
        if self._peer_ids is not None:
            try:
                self._peer_ids[msg.client_id].verify(
                    msg.signature, _consistency_payload(self.session_id, self._context, self.u3))
            except (InvalidSignature, KeyError):
                return "bad consistency signature"
        self._acks[msg.client_id] = msg.signature
        return None

    def _on_unmask_response(self, msg: M.UnmaskResponse) -> str | None:
        v = msg.client_id
        if v in self._responders:
            return "duplicate unmask response"
        dropped = set(self.u2) - set(self.u3)
        for shares, wanted in ((msg.self_mask_shares, set(self.u3)), (msg.key_shares, dropped)):
            owners = [s.owner_id for s in shares]
            if len(set(owners)) != len(owners) or not set(owners) <= wanted:
                return "shares for owners that were not asked for"
            if any(v != u and v not in self._graph[u] for u in owners):
                return "shares from a client that holds none for that owner"
            if any(len(s.share) != SHARE_BYTES for s in shares):
                return "share of the wrong size"
        for s in msg.self_mask_shares:
            self._b_shares.setdefault(s.owner_id, {})[v] = s.share
        for s in msg.key_shares:
            self._sk_shares.setdefault(s.owner_id, {})[v] = s.share
        self._responders.add(v)
        return None

    # ------------------------------------------------------------------ advance
    def _need(self, have: Iterable[int], stage: str) -> tuple[int, ...]:
        have = tuple(sorted(have))
        if len(have) < self.config.threshold:
            self.state = ServerState.ABORTED
            self._sum[:] = 0
            raise ProtocolAbort(
                f"secagg {stage}: only {len(have)} clients remain, threshold is {self.config.threshold}: round aborted"
            )
        return have

    def advance(self) -> dict[int, object]:
        """Close the current round; return the server messages to deliver (client id -> message)."""
        t0 = time.perf_counter()
        try:
            return self._advance()
        finally:
            self.seconds += time.perf_counter() - t0

    def _advance(self) -> dict[int, object]:
        sid = self.session_id
        if self.state is ServerState.COLLECT_KEYS:
            self.u1 = self._need(self._keys, "advertise keys")
            self.config.encoder.check_cohort(len(self.u1))
            keys = tuple(self._keys[u] for u in self.u1)
            gkey = session_graph_key(sid, self._graph_commits, keys)
            self._graph = _complete(self.u1) if gkey is None else self.config.graph(gkey, self.u1)
            check_graph(self._graph)
            self.state = ServerState.COLLECT_SHARES
            return key_broadcasts(sid, self.u1, self._keys, self._graph, self._graph_commits is not None)
        if self.state is ServerState.COLLECT_SHARES:
            self.u2 = self._need(self._shares, "share keys")
            inbox: dict[int, list[M.Ciphertext]] = {v: [] for v in self.u2}
            for u in self.u2:
                for c in self._shares[u].ciphertexts:
                    if c.peer_id in inbox:
                        inbox[c.peer_id].append(M.Ciphertext(u, c.data))
            self.state = ServerState.COLLECT_MASKED
            return {v: M.ShareBroadcast(sid, v, tuple(inbox[v])) for v in self.u2}
        if self.state is ServerState.COLLECT_MASKED:
            self.u3 = self._need(self._masked, "masked input")
            self.state = ServerState.COLLECT_ACKS
            return {v: M.ConsistencyCheck(sid, v, self.u3) for v in self.u3}
        if self.state is ServerState.COLLECT_ACKS:
            self.u4 = self._need(self._acks, "consistency check")
            sigs = tuple(M.Signature(u, self._acks[u]) for u in self.u4) if self._peer_ids is not None else ()
            dropped = tuple(sorted(set(self.u2) - set(self.u3)))
            self.state = ServerState.COLLECT_UNMASK
            return {v: M.UnmaskRequest(sid, v, self.u3, dropped, sigs) for v in self.u4}
        if self.state is ServerState.COLLECT_UNMASK:
            self._need(self._responders, "unmasking")
            self._unmask()
            self.state = ServerState.DONE
            return {}
        raise ProtocolAbort(f"secagg server: advance called in state {self.state.value}")

    def _owner_threshold(self, u: int) -> int:
        holders = len(self._graph[u]) + 1
        return self.config.share_threshold(holders, holders == len(self.u1))

    def _unmask(self) -> None:
        sid, total = self.session_id, self._sum
        prg = MaskExpander(self.config.vector_length)
        try:
            for u in self.u3:
                seed = combine_shares(self._b_shares.get(u, {}), self._owner_threshold(u), KEY_BYTES)
                prg.add_into(total, self_mask_key(seed, sid, u), -1)
            survivors = set(self.u3)
            for u in sorted(set(self.u2) - survivors):
                raw = combine_shares(self._sk_shares.get(u, {}), self._owner_threshold(u), KEY_BYTES)
                sk = X25519PrivateKey.from_private_bytes(raw)
                if not hmac.compare_digest(sk.public_key().public_bytes_raw(), self._keys[u].mask_pk):
                    raise ProtocolAbort(f"secagg unmasking: shares of client {u}'s mask key are inconsistent")
                for v in sorted(self._graph[u] & survivors):
                    shared = sk.exchange(X25519PublicKey.from_public_bytes(self._keys[v].mask_pk))
                    # v added sign(v, u) * PRG(s_uv); remove it
                    prg.add_into(total, pairwise_key(shared, sid, u, v), -_mask_sign(v, u))
        except ProtocolAbort as exc:
            self.state = ServerState.ABORTED
            total[:] = 0
            raise ProtocolAbort(
                f"secagg unmasking: cannot remove every mask ({exc}); too many share holders of one "
                f"client dropped (with neighbours, raise the degree or lower neighbour_threshold): round aborted"
            ) from exc
        self._result = total

    @property
    def degree(self) -> int:
        """Number of neighbours of each client in this session's graph (0 before keys are collected)."""
        return len(next(iter(self._graph.values()))) if self._graph else 0

    def result(self) -> np.ndarray:
        """The encoded (uint64) sum of the inputs of U3; only after a completed unmasking round."""
        if self.state is not ServerState.DONE or self._result is None:
            raise ProtocolAbort(f"secagg server: no result in state {self.state.value}")
        return self._result


# =========================================================================== in-process driver
_STAGE_OF_REPLY = {  # reply message type -> DropoutPlan stage before which a client may go silent
    M.AdvertiseKeys: "advertise",
    M.ShareKeys: "share",
    M.MaskedInput: "masked_input",
    M.ConsistencyAck: "consistency",
    M.UnmaskResponse: "unmask",
}


class MaskingSummer:
    """:class:`SecureSummer` for masking mode: runs N :class:`ClientProtocol` and one
    :class:`ServerProtocol` in-process, honouring a :class:`DropoutPlan` at every stage.

    Inputs: float vectors with every element in ``[-clip_range, clip_range]`` (out-of-range input
    is refused with ``ConfigError``; weights are applied by the caller before). The result is exact
    up to the fixed-point step ``2^-frac_bits`` per element per client.
    ``neighbours``: SecAgg+ degree (None = automatic, see :class:`MaskingConfig`;
    ``complete_graph=True`` forces every pair). ``wire_stats``: measure the JSON bytes
    of every message (adds serialisation time outside the timers).
    """

    mode = "masking"

    def __init__(
        self,
        clip_range: float = 1.0,
        frac_bits: int = 32,
        max_clients: int = 1024,
        neighbours: int | None = None,
        neighbour_threshold: int | None = None,
        wire_stats: bool = True,
        complete_graph: bool = False,
    ) -> None:
        self.encoder = FixedPointEncoder(clip_range=clip_range, frac_bits=frac_bits, max_clients=max_clients)
        self.neighbours = neighbours
        self.neighbour_threshold = neighbour_threshold
        self.wire_stats = wire_stats
        self.complete_graph = complete_graph

    def secure_sum(
        self,
        vectors: Mapping[int, np.ndarray],
        *,
        threshold: int,
        session_id: bytes,
        dropouts: DropoutPlan | None = None,
    ) -> SecureSumResult:
        """Sum over the clients whose masked input reached the server; ``ProtocolAbort`` below t."""
        if not vectors:
            raise ConfigError("secagg: no client vectors to sum")
        length = int(np.asarray(next(iter(vectors.values()))).shape[0])
        config = MaskingConfig(threshold, length, self.encoder, self.neighbours, self.neighbour_threshold,
                               self.complete_graph)
        self.encoder.check_cohort(len(vectors))
        plan = dropouts or DropoutPlan()
        server = ServerProtocol(session_id, config)
        clients = {i: ClientProtocol(i, session_id, config, vectors[i]) for i in sorted(vectors)}
        client_s = {i: 0.0 for i in clients}
        up = {s: {} for s in STAGES}
        down = {s: {} for s in STAGES}

        def size(msg: object) -> int:
            return M.wire_size(msg) if self.wire_stats else 0  # type: ignore[arg-type]

        def client_step(i: int, fn: Callable[[], object], stage: str) -> None:
            if i in plan.dropped_by(stage):
                return
            t0 = time.perf_counter()
            reply = fn()
            client_s[i] += time.perf_counter() - t0
            up[stage][i] = size(reply)
            server.receive(reply)

        for i, c in clients.items():
            client_step(i, c.advertise, "advertise")
        for stage in STAGES[1:]:
            outgoing = server.advance()
            for i, msg in outgoing.items():
                if i in plan.dropped_by(stage):
                    continue
                down[stage][i] = size(msg)
                client_step(i, lambda c=clients[i], m=msg: c.handle(m), stage)
        server.advance()
        encoded = server.result()
        t0 = time.perf_counter()
        total = self.encoder.decode(encoded)
        server.seconds += time.perf_counter() - t0

        def mean(d: dict) -> float:
            return float(np.mean(list(d.values()))) if d else 0.0

        per_stage = {s: {"up": mean(up[s]), "down": mean(down[s])} for s in STAGES}
        active = [i for i in clients if client_s[i] > 0]
        stats = {
            "seconds": {
                "client_mean": float(np.mean([client_s[i] for i in active])) if active else 0.0,
                "client_max": max(client_s.values()),
                "server": server.seconds,
                "client_encode_mean": mean({i: c.timings["encode"] for i, c in clients.items() if "encode" in c.timings}),
                "client_mask_mean": mean({i: c.timings["mask"] for i, c in clients.items() if "mask" in c.timings}),
            },
            "bytes_per_client": per_stage,
            "bytes_per_client_total": sum(v["up"] + v["down"] for v in per_stage.values()),
            "u_sizes": [len(server.u1), len(server.u2), len(server.u3), len(server.u4)],
            "dropped": sorted(set(server.u2) - set(server.u3)),
            "threshold": threshold,
            "neighbours": self.neighbours,
            "degree": server.degree,
            "frac_bits": self.encoder.frac_bits,
            "clip_range": self.encoder.clip_range,
        }
        return SecureSumResult(total, server.u3, self.mode, stats)
