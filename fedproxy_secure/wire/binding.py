"""What every site binds into the key agreement of a round, so a server cannot single a site out.

Two things, both shared by the server and the sites (neither imports the other):

**One config per round.** :func:`round_config_digest` is the SHA-256 of the canonical signed round
config (everything the operator signed: the config and its ``kid``, not the signature bytes). Each
site signs this digest, with its enrolled identity key, into every key-agreement message it sends
(masking: advertised keys and the consistency ack; HE: the key holder's descriptor and every
envelope) and checks its peers' signatures against *its own* digest. A server that hands two sites
two different configs (a tiny ``clip_norm`` to every site but one, another threshold, another
graph degree, another A seed) makes every honest site abort at the first signature check, before
any masked or encrypted input leaves it. SA-H-TIES phase B binds :func:`phase_b_context`: the round
digest and the digest of the operator-signed phase-B message (T, K, the survivors, the phase-B
cohort, ``h_range``, the options), so sites given different T abort phase B before their phase-B
input leaves.

**A SecAgg+ graph the server cannot grind** (commit-reveal). At ``join`` every site sends
:func:`graph_commit` of a fresh 32-byte nonce; the server lists the commitments of the cohort in
the signed round config (``secagg_options.graph_commits``), so every commitment is fixed before any
nonce is revealed. Each site reveals its nonce inside its signed advertised keys. The graph seed is
:func:`graph_seed` over the session id and *every* committed nonce. If any committed member did
not reveal a nonce matching its commitment, every party falls back to the complete graph, so the
server's only levers are "sparse with a seed nobody chose" or "complete" (secure, more traffic),
or aborting the round (visible to every site; a fresh round draws fresh nonces).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Mapping

from fedproxy_secure.errors import ProtocolAbort
from fedproxy_secure.wire.canonical import canonical_json

__all__ = ["CONFIG_DIGEST_LABEL", "PHASE_B_CONTEXT_LABEL", "GRAPH_COMMIT_LABEL", "GRAPH_SEED_LABEL", "NONCE_BYTES",
           "round_config_digest", "phase_b_context", "new_graph_nonce", "graph_commit", "parse_graph_commits",
           "graph_seed", "length_prefixed"]

CONFIG_DIGEST_LABEL = b"fedproxy-secure/v1/round-config-digest\n"
PHASE_B_CONTEXT_LABEL = b"fedproxy-secure/v1/sa-hties-phase-b-context\n"
GRAPH_COMMIT_LABEL = b"fedproxy-secure/v1/secagg-graph-commit\n"
GRAPH_SEED_LABEL = b"fedproxy-secure/v1/secagg-graph-seed\n"
NONCE_BYTES = 32


def length_prefixed(*parts: bytes) -> bytes:
    """``parts`` each prefixed with its 4-byte big-endian length (an unambiguous concatenation)."""
    return b"".join(len(p).to_bytes(4, "big") + bytes(p) for p in parts)


def round_config_digest(cfg: dict) -> bytes:
    """SHA-256 (domain-separated) of the canonical JSON of a round config without its ``signature``.

    Guarantees: equal for the config the operator signed and the one a site verified
    (:func:`~fedproxy_secure.protocol.roundcfg.verify_round_config` returns it without the
    signature, with ``kid``); any changed field changes it. Pure function.
    """
    if not isinstance(cfg, dict):
        raise ProtocolAbort("round config digest: the round config is not an object")
    body = {k: v for k, v in cfg.items() if k != "signature"}
    return hashlib.sha256(CONFIG_DIGEST_LABEL + canonical_json(body)).digest()


def phase_b_context(round_digest: bytes, phase_b_body: dict) -> bytes:
    """What SA-H-TIES phase B binds: the round config digest and the signed phase-B message's digest."""
    if not isinstance(phase_b_body, dict):
        raise ProtocolAbort("phase-B context: the phase-B message is not an object")
    body = {k: v for k, v in phase_b_body.items() if k != "signature"}
    return hashlib.sha256(PHASE_B_CONTEXT_LABEL + length_prefixed(bytes(round_digest), canonical_json(body))).digest()


def new_graph_nonce() -> bytes:
    """A fresh 32-byte nonce from the OS CSPRNG (one per site and round)."""
    return os.urandom(NONCE_BYTES)


def graph_commit(nonce: bytes) -> bytes:
    """The commitment a site sends at ``join``: SHA-256 over a domain label and its 32-byte nonce."""
    if len(nonce) != NONCE_BYTES:
        raise ProtocolAbort(f"graph nonce must be {NONCE_BYTES} bytes")
    return hashlib.sha256(GRAPH_COMMIT_LABEL + bytes(nonce)).digest()


def parse_graph_commits(raw: object) -> dict[int, bytes]:
    """``secagg_options.graph_commits`` ({secagg id: 64 hex}) as {int: 32 bytes}; ``{}`` when absent.

    Raises ``ProtocolAbort`` naming the field on a malformed entry (the config is signed, so a
    malformed one is the operator's bug or tampering).
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ProtocolAbort("secagg_options.graph_commits must map secagg ids to 64 hex characters")
    out: dict[int, bytes] = {}
    for k, v in raw.items():
        if not (isinstance(k, str) and k.isdigit() and isinstance(v, str) and len(v) == 2 * 32):
            raise ProtocolAbort(f"secagg_options.graph_commits[{k!r}] must be 64 hex characters")
        try:
            out[int(k)] = bytes.fromhex(v)
        except ValueError:
            raise ProtocolAbort(f"secagg_options.graph_commits[{k!r}] is not hex") from None
    return out


def graph_seed(session_id: bytes, commits: Mapping[int, bytes], reveals: Mapping[int, bytes]) -> bytes | None:
    """The SecAgg+ graph seed, or None (complete graph) unless every committed member revealed.

    ``reveals`` are the nonces in the advertised keys of U1 (by secagg id). Returns None when the
    commitments are empty, when U1 differs from the committed set, or when any nonce does not open
    its commitment (constant-time comparison). Otherwise SHA-256 over a domain label, the session
    id and every (id, nonce) in id order. Pure function: every honest party computes the same.
    """
    if not commits:
        return None
    if set(reveals) != set(commits):  # a member left out of (or added to) U1: no re-keying by choosing U1
        return None
    for i, nonce in reveals.items():  # each nonce must open the commitment signed before any reveal
        if len(nonce) != NONCE_BYTES or not hmac.compare_digest(graph_commit(nonce), commits.get(i, b"")):
            return None
    h = hashlib.sha256(GRAPH_SEED_LABEL + length_prefixed(bytes(session_id)))
    for i in sorted(reveals):
        h.update(int(i).to_bytes(8, "big") + reveals[i])
    return h.digest()
