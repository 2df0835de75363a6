"""Chunked, resumable uploads of stage messages too large for one request body.

A client that has a large message for ``(round, stage)`` (an HE envelope, a long masked vector)
*declares* it with its total size and SHA-256, then sends fixed-size chunks, each its own signed
request bounded before it is read. The server stores every chunk durably before it acknowledges
it, so a client that lost its connection (or a server that restarted) resumes by asking which
chunks are held and sending only the others. On *commit* the server joins the chunks, checks the
declared SHA-256 (constant time) and hands the bytes to the same acceptance path as a single-body
submission. Rules (enforced by the store, in the same transaction as the write):

- one upload per (round, stage, client), for the round's current stage only; a second declaration
  with the same size and hash resumes it, one with another size or hash is refused;
- chunk ``i`` has exactly ``chunk_size`` bytes (the last one the remainder); re-sending an
  identical chunk is acknowledged again, a different body for a stored index is refused;
- per client at most ``max_open`` uncommitted uploads and ``max_bytes`` declared bytes in them;
- accepting the client's message for the stage marks its upload ``committed`` in the same
  transaction (chunks dropped; a repeated commit is answered as a duplicate);
- when a stage or the round closes, the round's uncommitted uploads are discarded in the same
  transaction; a chunk or commit that arrives later is refused naming the stage.

Chunks are raw bytes; the joined message is strict JSON like any other stage message (no pickle).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fedproxy_secure.errors import ProtocolAbort

MAX_CHUNKS = 1 << 16
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: paths of the upload routes, for the body limits applied before a body is read
CHUNK_PATH = re.compile(r"^/v1/round/\d+/[a-z_]+/upload/\d+$")
CONTROL_PATH = re.compile(r"^/v1/round/\d+/[a-z_]+/upload(/commit)?$")
CONTROL_MAX_BODY = 4096


@dataclass(frozen=True)
class UploadLimits:
    """Server-side limits of chunked uploads (operator settings)."""

    chunk_bytes: int = 1 << 20          # size of every chunk but the last
    max_bytes: int = 256 << 20          # declared bytes of a client's open uploads, together
    max_open: int = 1                   # open (uncommitted) uploads per client

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1 or self.max_bytes < 1 or self.max_open < 1:
            raise ValueError("upload limits must be positive (chunk_bytes, max_bytes, max_open)")


@dataclass(frozen=True)
class UploadRow:
    """One upload as stored: what was declared and which chunk indices are held."""

    round_id: int
    stage: str
    client_id: str
    size: int
    sha256: str
    chunk_size: int
    status: str                         # open | committed
    have: tuple[int, ...] = field(default=())

    @property
    def chunks(self) -> int:
        """Number of chunks of the declared message."""
        return n_chunks(self.size, self.chunk_size)

    def missing(self) -> list[int]:
        """Indices not yet held, ascending."""
        held = set(self.have)
        return [i for i in range(self.chunks) if i not in held]

    def to_reply(self) -> dict:
        """The JSON the server answers to a declaration or a status query."""
        return {"round": self.round_id, "stage": self.stage, "size": self.size, "sha256": self.sha256,
                "chunk_size": self.chunk_size, "chunks": self.chunks, "status": self.status,
                "have": list(self.have)}


def n_chunks(size: int, chunk_size: int) -> int:
    """Chunks needed for ``size`` bytes (ceil division)."""
    return -(-size // chunk_size)


def chunk_length(size: int, chunk_size: int, index: int) -> int:
    """Exact byte length chunk ``index`` must have; ``ProtocolAbort`` for an index out of range."""
    n = n_chunks(size, chunk_size)
    if not 0 <= index < n:
        raise ProtocolAbort(f"chunk index {index} is out of range: the upload has chunks 0..{n - 1}")
    return chunk_size if index < n - 1 else size - chunk_size * (n - 1)


def parse_declaration(msg: object, limits: UploadLimits) -> tuple[int, str]:
    """``(size, sha256)`` from a declaration ``{"size": int, "sha256": hex}``; ``ProtocolAbort`` else.

    The size must be positive and need at most :data:`MAX_CHUNKS` chunks (the per-client byte
    limit is checked by the store, against the client's other open uploads).
    """
    if not isinstance(msg, dict) or set(msg) != {"size", "sha256"}:
        raise ProtocolAbort("upload declaration must be {size, sha256}")
    size, sha = msg["size"], msg["sha256"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ProtocolAbort(f"upload size {size!r}: must be a positive integer")
    if n_chunks(size, limits.chunk_bytes) > MAX_CHUNKS:
        raise ProtocolAbort(f"upload size {size} needs more than {MAX_CHUNKS} chunks of {limits.chunk_bytes} bytes")
    if not isinstance(sha, str) or not _HEX64.match(sha):
        raise ProtocolAbort("upload sha256 must be 64 lowercase hex characters")
    return size, sha
