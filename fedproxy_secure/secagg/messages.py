"""Typed messages of the masking protocol, and their JSON-able wire form.

Every message is a frozen dataclass carrying the ``session_id`` it belongs to. ``to_dict`` gives a
dict of str/int/list values (bytes as standard base64, vectors as base64 of little-endian uint64),
with a ``"type"`` tag; :func:`message_from_dict` / ``Cls.from_dict`` check the tag, the exact key
set and every value's type and size, and raise ``ProtocolAbort`` on anything malformed. The network
layer only needs ``json.dumps(msg.to_dict())`` and ``message_from_dict(json.loads(text))``.

Flow (client -> server unless noted):
  AdvertiseKeys -> [server] KeyBroadcast -> ShareKeys -> [server] ShareBroadcast -> MaskedInput
  -> [server] ConsistencyCheck -> ConsistencyAck -> [server] UnmaskRequest -> UnmaskResponse
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from fedproxy_secure.errors import ProtocolAbort
from fedproxy_secure.wire.codec import b64d, b64e, u64_from_b64, u64_to_b64
from fedproxy_secure.secagg.idset import decode_ids, encode_ids

MAX_ID = (1 << 63) - 1
MAX_BYTES = 1 << 34  # refuse absurd payloads before decoding them
MAX_SET = 1 << 20  # members of one id set ("idset" fields: U3 and the dropped clients)


def _b64d(s: Any, what: str) -> bytes:
    return b64d(s, f"message field {what}", MAX_BYTES)


def _id(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_ID:
        raise ProtocolAbort(f"message field {what}: {v!r} is not a positive client id")
    return v


def _encode(kind: Any, v: Any) -> Any:
    if kind == "bytes":
        return b64e(v)
    if kind == "id":
        return int(v)
    if kind == "ids":
        return [int(i) for i in v]
    if kind == "idset":  # compact canonical set (secagg.idset); "" for the empty set
        return b64e(encode_ids(v)) if len(v) else ""
    if kind == "vector":
        return u64_to_b64(v)
    return [x.to_dict() for x in v]  # tuple of sub-messages


def _decode(kind: Any, v: Any, what: str) -> Any:
    if kind == "bytes":
        return _b64d(v, what)
    if kind == "id":
        return _id(v, what)
    if kind == "ids":
        if not isinstance(v, list):
            raise ProtocolAbort(f"message field {what}: expected a list of ids")
        return tuple(_id(i, what) for i in v)
    if kind == "idset":
        if v == "":
            return ()
        return decode_ids(b64d(v, f"message field {what}", 16 * MAX_SET), f"message field {what}", MAX_SET)
    if kind == "vector":
        return u64_from_b64(v, f"message field {what}", MAX_BYTES)
    if not isinstance(v, list):
        raise ProtocolAbort(f"message field {what}: expected a list")
    return tuple(kind.from_dict(x) for x in v)


class _Wire:
    """Mix-in: schema-driven ``to_dict`` / strict ``from_dict``."""

    TYPE: ClassVar[str] = ""
    SCHEMA: ClassVar[dict[str, Any]] = {}

    def to_dict(self) -> dict:
        """JSON-able dict of this message (with its ``type`` tag)."""
        d: dict[str, Any] = {"type": self.TYPE}
        for name, kind in self.SCHEMA.items():
            d[name] = _encode(kind, getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, d: Any):
        """Parse and validate a dict made by ``to_dict``; ``ProtocolAbort`` on anything else."""
        if not isinstance(d, dict):
            raise ProtocolAbort(f"{cls.__name__}: expected a JSON object")
        if d.get("type") != cls.TYPE:
            raise ProtocolAbort(f"{cls.__name__}: type tag {d.get('type')!r} != {cls.TYPE!r}")
        expected = set(cls.SCHEMA) | {"type"}
        if set(d) != expected:
            raise ProtocolAbort(
                f"{cls.__name__}: fields {sorted(set(d) ^ expected)} missing or unexpected"
            )
        return cls(**{n: _decode(k, d[n], f"{cls.TYPE}.{n}") for n, k in cls.SCHEMA.items()})


# ---------------------------------------------------------------- pieces inside messages
@dataclass(frozen=True)
class PeerKeys(_Wire):
    """One client's advertised public keys (X25519, 32 bytes each), optional Ed25519 signature, and the
    nonce it committed to at ``join`` for the SecAgg+ graph seed (empty when there is none;
    :mod:`fedproxy_secure.wire.binding`)."""

    client_id: int
    enc_pk: bytes
    mask_pk: bytes
    signature: bytes = b""
    graph_nonce: bytes = b""
    TYPE: ClassVar[str] = "peer_keys"
    SCHEMA: ClassVar[dict] = {"client_id": "id", "enc_pk": "bytes", "mask_pk": "bytes", "signature": "bytes",
                              "graph_nonce": "bytes"}


@dataclass(frozen=True)
class Ciphertext(_Wire):
    """An AEAD ciphertext of shares, tagged with the *other* party's id."""

    peer_id: int
    data: bytes
    TYPE: ClassVar[str] = "ciphertext"
    SCHEMA: ClassVar[dict] = {"peer_id": "id", "data": "bytes"}


@dataclass(frozen=True)
class Share(_Wire):
    """A Shamir share of a secret owned by ``owner_id``."""

    owner_id: int
    share: bytes
    TYPE: ClassVar[str] = "share"
    SCHEMA: ClassVar[dict] = {"owner_id": "id", "share": "bytes"}


@dataclass(frozen=True)
class Signature(_Wire):
    """A client's signature in the consistency round."""

    client_id: int
    signature: bytes
    TYPE: ClassVar[str] = "signature"
    SCHEMA: ClassVar[dict] = {"client_id": "id", "signature": "bytes"}


# ---------------------------------------------------------------- round 0: advertise keys
@dataclass(frozen=True)
class AdvertiseKeys(_Wire):
    """Client -> server: the client's two fresh X25519 public keys for this session."""

    session_id: bytes
    keys: PeerKeys
    TYPE: ClassVar[str] = "advertise_keys"
    SCHEMA: ClassVar[dict] = {"session_id": "bytes", "keys": "sub"}

    @property
    def client_id(self) -> int:
        return self.keys.client_id

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "session_id": b64e(self.session_id), "keys": self.keys.to_dict()}

    @classmethod
    def from_dict(cls, d: Any) -> "AdvertiseKeys":
        if not isinstance(d, dict) or d.get("type") != cls.TYPE or set(d) != {"type", "session_id", "keys"}:
            raise ProtocolAbort("AdvertiseKeys: malformed message")
        return cls(_b64d(d["session_id"], "session_id"), PeerKeys.from_dict(d["keys"]))


@dataclass(frozen=True)
class KeyBroadcast(_Wire):
    """Server -> client: the advertised keys a client needs, and the set U1.

    Complete graph: ``keys`` holds every member of U1 (``members`` and ``nonces`` empty). SecAgg+
    graph: ``keys`` holds only the recipient's and its k neighbours' keys, ``members`` is U1 in the
    compact :mod:`fedproxy_secure.secagg.idset` form, and ``nonces`` (commit-reveal graph seed only)
    is every member's 32-byte graph nonce in U1 order: O(k) keys instead of O(n).
    """

    session_id: bytes
    recipient: int
    keys: tuple[PeerKeys, ...]
    members: bytes = b""
    nonces: bytes = b""
    TYPE: ClassVar[str] = "key_broadcast"
    SCHEMA: ClassVar[dict] = {"session_id": "bytes", "recipient": "id", "keys": PeerKeys, "members": "bytes",
                              "nonces": "bytes"}


# ---------------------------------------------------------------- round 1: share keys
@dataclass(frozen=True)
class ShareKeys(_Wire):
    """Client -> server: the client's shares for each peer, each encrypted to that peer."""

    session_id: bytes
    client_id: int
    ciphertexts: tuple[Ciphertext, ...]  # peer_id = recipient
    TYPE: ClassVar[str] = "share_keys"
    SCHEMA: ClassVar[dict] = {"session_id": "bytes", "client_id": "id", "ciphertexts": Ciphertext}


@dataclass(frozen=True)
class ShareBroadcast(_Wire):
    """Server -> client: the ciphertexts addressed to the recipient (senders form U2)."""

    session_id: bytes
    recipient: int
    ciphertexts: tuple[Ciphertext, ...]  # peer_id = sender
    TYPE: ClassVar[str] = "share_broadcast"
    SCHEMA: ClassVar[dict] = {"session_id": "bytes", "recipient": "id", "ciphertexts": Ciphertext}


# ---------------------------------------------------------------- round 2: masked input
@dataclass(frozen=True, eq=False)
class MaskedInput(_Wire):
    """Client -> server: ``encode(x) + self mask + pairwise masks`` (uint64, mod 2^64)."""

    session_id: bytes
    client_id: int
    vector: np.ndarray
    TYPE: ClassVar[str] = "masked_input"
    SCHEMA: ClassVar[dict] = {"session_id": "bytes", "client_id": "id", "vector": "vector"}


# ---------------------------------------------------------------- round 3: consistency check
@dataclass(frozen=True)
class ConsistencyCheck(_Wire):
    """Server -> client: the clients whose masked inputs the server holds (U3; a compact id set on the wire)."""

    session_id: bytes
    recipient: int
    survivors: tuple[int, ...]
    TYPE: ClassVar[str] = "consistency_check"
    SCHEMA: ClassVar[dict] = {"session_id": "bytes", "recipient": "id", "survivors": "idset"}


@dataclass(frozen=True)
class ConsistencyAck(_Wire):
    """Client -> server: acknowledgement of U3, signed when the client has an identity key."""

    session_id: bytes
    client_id: int
    signature: bytes
    TYPE: ClassVar[str] = "consistency_ack"
    SCHEMA: ClassVar[dict] = {"session_id": "bytes", "client_id": "id", "signature": "bytes"}


# ---------------------------------------------------------------- round 4: unmasking
@dataclass(frozen=True)
class UnmaskRequest(_Wire):
    """Server -> client: survivors (want self-mask shares) and dropped (want mask-key shares), compact id sets
    on the wire."""

    session_id: bytes
    recipient: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: tuple[Signature, ...]
    TYPE: ClassVar[str] = "unmask_request"
    SCHEMA: ClassVar[dict] = {
        "session_id": "bytes", "recipient": "id", "survivors": "idset", "dropped": "idset", "signatures": Signature,
    }


@dataclass(frozen=True)
class UnmaskResponse(_Wire):
    """Client -> server: self-mask shares of survivors, mask-key shares of dropped clients."""

    session_id: bytes
    client_id: int
    self_mask_shares: tuple[Share, ...]
    key_shares: tuple[Share, ...]
    TYPE: ClassVar[str] = "unmask_response"
    SCHEMA: ClassVar[dict] = {
        "session_id": "bytes", "client_id": "id", "self_mask_shares": Share, "key_shares": Share,
    }


MESSAGE_TYPES: dict[str, type] = {
    c.TYPE: c
    for c in (AdvertiseKeys, KeyBroadcast, ShareKeys, ShareBroadcast, MaskedInput,
              ConsistencyCheck, ConsistencyAck, UnmaskRequest, UnmaskResponse)
}


def message_from_dict(d: Any):
    """Parse any protocol message from its ``to_dict`` form (dispatch on ``type``); strict."""
    if not isinstance(d, dict) or d.get("type") not in MESSAGE_TYPES:
        raise ProtocolAbort(f"unknown secagg message type {d.get('type') if isinstance(d, dict) else d!r}")
    return MESSAGE_TYPES[d["type"]].from_dict(d)


def wire_size(msg: _Wire) -> int:
    """Bytes this message takes as compact JSON (what the network layer carries)."""
    import json

    return len(json.dumps(msg.to_dict(), separators=(",", ":")))
