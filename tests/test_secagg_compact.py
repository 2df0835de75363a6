"""O(k) key broadcast on the SecAgg+ graph (issue 28): each site receives its neighbours' keys and U1 as a compact set.

On a sparse graph the server sends every client only its own and its k neighbours' advertised keys,
U1 in the canonical :mod:`fedproxy_secure.secagg.idset` form and (commit-reveal graph seed) every
member's nonce. A client aborts unless the keys are exactly those of the neighbourhood it derives
itself from U1 and the seed; every check of the full form still runs on what it receives.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from fedproxy_secure.errors import ProtocolAbort
from fedproxy_secure.wire.binding import graph_commit, new_graph_nonce
from fedproxy_secure.wire.threshold import effective_threshold, secagg_plus_degree
from fedproxy_secure.secagg import messages as M
from fedproxy_secure.secagg.encoding import FixedPointEncoder
from fedproxy_secure.secagg.idset import decode_ids, encode_ids
from fedproxy_secure.secagg.masking import ClientProtocol, ClientState, MaskingConfig, ServerProtocol

N, P = 80, 8  # above SPARSE_CUTOFF: the automatic graph is sparse


# ----------------------------------------------------------------------------- the id set codec
@pytest.mark.parametrize("ids", [[1], list(range(1, 1001)), [5, 9, 2**40, 2**63 - 1], list(range(3, 200, 7))])
def test_id_set_round_trips_canonically(ids):
    data = encode_ids(ids)
    assert decode_ids(data, "ids", 10_000) == tuple(sorted(ids))
    assert encode_ids(reversed(ids)) == data


def test_id_set_is_about_one_bit_per_member_for_a_dense_cohort():
    assert len(encode_ids(range(1, 1001))) == 1 + 8 + 125


@pytest.mark.parametrize("data, why", [
    (b"\x00" + (1).to_bytes(8, "big") + b"\x01\x00", "malformed"),  # bitmap with a zero last byte
    (b"\x01\x01\x00", "repeated"),  # varint form with a zero gap
    (b"\x01\x81", "truncated"),
    (b"\x02\x01", "unknown"),
    (b"\x01" + b"\x01" * 100, "canonical"),  # 1..100 in varint form: the bitmap is the shorter, canonical one
    (b"\x00" + (0).to_bytes(8, "big") + b"\x01", "outside"),  # id 0
])
def test_id_set_refuses_what_encode_cannot_produce(data, why):
    with pytest.raises(ProtocolAbort, match=why):
        decode_ids(data, "ids", 10_000)


def test_id_set_refuses_more_members_than_allowed():
    with pytest.raises(ProtocolAbort, match="expected 1..10"):
        decode_ids(encode_ids(range(1, 12)), "ids", 10)


# ----------------------------------------------------------------------------- the protocol
def _session(n: int = N, *, commits: bool = False, neighbours: int | None = None):
    sid = os.urandom(32)
    cfg = MaskingConfig(effective_threshold("masking", n), P, FixedPointEncoder(max_clients=1024), neighbours)
    rng = np.random.default_rng(0)
    vs = {i: rng.uniform(-1, 1, P) for i in range(1, n + 1)}
    nonces = {i: new_graph_nonce() for i in vs} if commits else {}
    gc = {i: graph_commit(nc) for i, nc in nonces.items()} if commits else None
    server = ServerProtocol(sid, cfg, graph_commits=gc)
    clients = {i: ClientProtocol(i, sid, cfg, v, graph_commits=gc, graph_nonce=nonces.get(i, b""))
               for i, v in vs.items()}
    for c in clients.values():
        assert server.receive(c.advertise())
    return sid, cfg, vs, server, clients


def _finish(server, clients, first: dict) -> np.ndarray:
    out = first
    while out:
        for i, m in out.items():
            assert server.receive(clients[i].handle(m))
        out = server.advance()
    return clients[1].config.encoder.decode(server.result())


@pytest.mark.parametrize("commits", [False, True])
def test_sparse_key_broadcast_carries_only_the_neighbourhood_and_the_sum_is_exact(commits):
    sid, cfg, vs, server, clients = _session(commits=commits)
    out = server.advance()
    k = secagg_plus_degree(N)
    for i, m in out.items():
        assert decode_ids(m.members, "U1", 1024) == tuple(range(1, N + 1))
        assert {p.client_id for p in m.keys} == set(server._graph[i]) | {i}  # noqa: SLF001
        assert len(m.keys) == k + 1 < N
        assert len(m.nonces) == (32 * N if commits else 0)
    total = _finish(server, clients, out)
    enc = FixedPointEncoder(max_clients=1024)
    np.testing.assert_array_equal(total, enc.decode(sum(enc.encode(v) for v in vs.values())))
    assert all(c.graph_sparse for c in clients.values())


def test_complete_graph_keeps_the_full_key_broadcast():
    _, _, _, server, _ = _session(10)
    for m in server.advance().values():
        assert len(m.keys) == 10 and m.members == b"" and m.nonces == b""


def _abort(client, msg, why: str) -> None:
    with pytest.raises(ProtocolAbort, match=why):
        client.handle(msg)
    assert client.state is ClientState.ABORTED


def test_a_non_neighbours_key_in_place_of_a_neighbours_makes_the_client_abort():
    _, _, _, server, clients = _session()
    out = server.advance()
    m = out[1]
    outsider = min(set(range(2, N + 1)) - {p.client_id for p in m.keys})
    outsider_key = next(p for p in out[outsider].keys if p.client_id == outsider)  # genuine, signed keys
    victim = max(p.client_id for p in m.keys if p.client_id != 1)
    swapped = tuple(p for p in m.keys if p.client_id != victim) + (outsider_key,)
    _abort(clients[1], dataclasses.replace(m, keys=swapped), "exactly this client's neighbours")


def test_a_member_set_the_server_shrank_or_mangled_makes_the_client_abort():
    _, _, _, server, clients = _session()
    out = server.advance()
    m = out[1]
    # a low id: every later member then takes another keystream value, so the ring order changes (without a
    # commit-reveal seed the server is trusted with U1, as it was with the full broadcast: this is a consistency check)
    absent = min(set(range(2, N + 1)) - {p.client_id for p in m.keys})
    shrunk = encode_ids(set(range(1, N + 1)) - {absent})
    _abort(clients[1], dataclasses.replace(m, members=shrunk), "neighbours' keys")
    _abort(clients[2], dataclasses.replace(out[2], members=out[2].members + b"\x00"), "malformed")
    _abort(clients[3], dataclasses.replace(out[3], members=b""), "threshold|neighbours")  # keys alone: U1 of k+1


def test_keys_of_a_client_outside_the_member_set_make_the_client_abort():
    _, _, _, server, clients = _session()
    m = server.advance()[1]
    mine = {p.client_id for p in m.keys}
    members = encode_ids(set(range(1, N + 1)) - {max(mine - {1})})
    _abort(clients[1], dataclasses.replace(m, members=members), "outside U1")


def test_withheld_or_altered_graph_nonces_make_the_client_abort():
    _, _, _, server, clients = _session(commits=True)
    out = server.advance()
    _abort(clients[1], dataclasses.replace(out[1], nonces=b""), "neighbours' keys")  # complete graph != k keys
    m = out[2]
    nb = sorted(p.client_id for p in m.keys if p.client_id != 2)[0]
    pos = nb - 1  # U1 is 1..N, nonces in U1 order
    bad = m.nonces[:32 * pos] + bytes(32) + m.nonces[32 * (pos + 1):]
    _abort(clients[2], dataclasses.replace(m, nonces=bad), "differs from its signed advertised keys")
    _abort(clients[3], dataclasses.replace(out[3], nonces=out[3].nonces[:-1]), "do not match the member set")
    _abort(clients[4], dataclasses.replace(out[4], members=b"", keys=out[4].keys), "nonces without the member set")
    m = out[5]  # with commitments, U1 other than the committed set gives the complete graph: never k keys
    last = max(set(range(1, N + 1)) - {p.client_id for p in m.keys})
    pos = last - 1
    _abort(clients[5], dataclasses.replace(m, members=encode_ids(set(range(1, N + 1)) - {last}),
                                           nonces=m.nonces[:32 * pos] + m.nonces[32 * (pos + 1):]), "neighbours' keys")


def test_survivor_and_dropped_lists_travel_as_compact_sets():
    sid = os.urandom(32)
    cc = M.ConsistencyCheck(sid, 7, tuple(range(1, 1001)))
    d = cc.to_dict()
    assert isinstance(d["survivors"], str) and len(d["survivors"]) < 200  # ~1 bit per member, base64
    assert M.ConsistencyCheck.from_dict(d) == cc
    ur = M.UnmaskRequest(sid, 7, tuple(range(1, 900)), (), ())
    assert M.UnmaskRequest.from_dict(ur.to_dict()) == ur and ur.to_dict()["dropped"] == ""
    import base64

    longer = base64.b64encode(b"\x01" + b"\x01" * 100).decode()  # 1..100 in the non-canonical varint form
    with pytest.raises(ProtocolAbort, match="canonical"):
        M.ConsistencyCheck.from_dict(dict(d, survivors=longer))
    with pytest.raises(ProtocolAbort):
        M.ConsistencyCheck.from_dict(dict(d, survivors=list(range(1, 1001))))  # the old list form is refused
