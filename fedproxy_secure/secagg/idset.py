"""Compact, canonical wire form of a set of client ids (the masking protocol's U1, and later lists).

A site of a SecAgg+ round needs the cohort U1 to derive its neighbours, but not every member's keys:
this codec sends U1 in about one bit per member instead of one advertised key (~165 bytes of
JSON) per member. Two forms, chosen by size, both canonical (one encoding per set, so a site can
hash what it received and compare):

* ``0x00`` + 8-byte big-endian base id + a bitmap (bit ``i`` of byte ``i // 8``, LSB first, stands
  for ``base + i``; the last byte is never zero) for dense sets such as 1..n;
* ``0x01`` + LEB128 varints of the first id and of each gap to the next (all gaps >= 1) for sparse
  sets of large ids.

:func:`decode_ids` refuses (``ProtocolAbort``) anything :func:`encode_ids` cannot produce: an unknown
tag, trailing garbage, a zero gap, an id outside 1..2^63-1, a set over ``max_ids`` members, or a
non-canonical form (a bitmap with a zero last byte, or the longer of the two forms).
"""

from __future__ import annotations

from typing import Iterable

from fedproxy_secure.errors import ProtocolAbort

MAX_ID = (1 << 63) - 1
_BITMAP, _VARINT = 0, 1


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _bitmap_form(ids: list[int]) -> bytes:
    base = ids[0]
    bits = bytearray((ids[-1] - base) // 8 + 1)
    for i in ids:
        off = i - base
        bits[off >> 3] |= 1 << (off & 7)
    return bytes([_BITMAP]) + base.to_bytes(8, "big") + bytes(bits)


def _varint_form(ids: list[int]) -> bytes:
    out = bytearray([_VARINT]) + _varint(ids[0])
    for a, b in zip(ids, ids[1:]):
        out += _varint(b - a)
    return bytes(out)


def encode_ids(ids: Iterable[int]) -> bytes:
    """The shorter canonical form of a non-empty set of ids in 1..2^63-1 (ties: the bitmap)."""
    s = sorted(set(int(i) for i in ids))
    if not s or s[0] < 1 or s[-1] > MAX_ID:
        raise ValueError("encode_ids: need a non-empty set of ids in 1..2^63-1")
    # a bitmap longer than the varint form is never built (a few huge ids would need a huge bitmap)
    varint = _varint_form(s)
    if (s[-1] - s[0]) // 8 + 10 <= len(varint):
        return _bitmap_form(s)
    return varint


def decode_ids(data: bytes, what: str, max_ids: int) -> tuple[int, ...]:
    """The sorted ids of ``data``; ``ProtocolAbort`` naming ``what`` unless it is :func:`encode_ids` output."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 2:
        raise ProtocolAbort(f"{what}: id set is empty or not bytes")
    data = bytes(data)
    if data[0] == _BITMAP:
        if len(data) < 10 or data[-1] == 0 or len(data) - 9 > 10 * max_ids + 16:  # canonical: <= the varint form
            raise ProtocolAbort(f"{what}: malformed id bitmap")
        base = int.from_bytes(data[1:9], "big")
        ids = [base + 8 * j + b for j, byte in enumerate(data[9:]) if byte for b in range(8) if byte >> b & 1]
    elif data[0] == _VARINT:
        ids, pos, prev = [], 1, 0
        while pos < len(data):
            v, shift = 0, 0
            while True:
                if pos >= len(data) or shift > 63:
                    raise ProtocolAbort(f"{what}: truncated id varint")
                b = data[pos]
                pos += 1
                v |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            if ids and v == 0:
                raise ProtocolAbort(f"{what}: repeated id")
            prev = prev + v
            ids.append(prev)
            if len(ids) > max_ids:
                break
    else:
        raise ProtocolAbort(f"{what}: unknown id set form {data[0]}")
    if not ids or len(ids) > max_ids:
        raise ProtocolAbort(f"{what}: {len(ids)} ids, expected 1..{max_ids}")
    if ids[0] < 1 or ids[-1] > MAX_ID:
        raise ProtocolAbort(f"{what}: id outside 1..2^63-1")
    if encode_ids(ids) != data:
        raise ProtocolAbort(f"{what}: id set is not in its canonical form")
    return tuple(ids)
