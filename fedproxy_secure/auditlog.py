"""Append-only, hash-chained, keyed and anchorable JSON-lines audit log.

Written by the server, the sites (``client join``) and serving; read by ``audit verify-log`` and
``audit check``. It sits below all of them (it imports only ``errors``, ``wire`` and ``artifacts``).

Each line is one JSON object ``{seq, ts, event, data, prev_hash, hash[, mac]}``. ``hash`` is the
SHA-256 (hex) of the canonical JSON (sorted keys, no spaces, UTF-8) of the entry without ``hash``
and ``mac``; ``prev_hash`` is the previous line's ``hash`` (64 zeros for the first line). Editing,
deleting, inserting or reordering a line breaks the chain at that line, which :func:`verify_log`
reports by line number. Every append is flushed and fsync'ed before it returns.

**Keyed.** A hash chain alone can be rewritten by anyone who can write the file: delete a line and
recompute the later hashes. A keyed log therefore carries ``mac`` = HMAC-SHA256 over the canonical
entry (which includes ``prev_hash`` and ``hash``, so the MACs are chained too), under a key derived
with HKDF-SHA256 (domain ``fedproxy-secure/v1/audit-log-hmac``) from a 32-byte server secret,
``DIR/keys/audit.secret`` (0600, made by ``server init``). A log next to a ``keys/audit.secret`` is
keyed automatically; a keyed log never takes an unkeyed line, and a verifier with the key refuses
a line without a valid MAC. This stops whoever can write the log but not read the secret (log
shipping, backups, another account); it cannot stop someone holding the server's secret.

**Anchored.** Against that, :func:`export_head` writes a *signed head*: the index and hash of the
last entry and the time, Ed25519-signed by the operator key (domain ``fedproxy-secure/v1/audit-head``).
Kept off the server, it pins the prefix of the log: ``verify_log(..., head=...)`` refuses a log
whose entry at the head's index has another hash (rewritten history) or that ends before it
(truncated tail), keyed or not.

**Segments.** A writer seals the active file (``audit.jsonl``) once it reaches ``segment_bytes`` by
renaming it to the next numbered segment (``audit.000001.jsonl``, ``audit.000002.jsonl``, ...) and goes
on in a fresh ``audit.jsonl``; ``seq`` and the hash chain continue across segments (the first line of a
segment carries the last hash of the one before). :func:`verify_log` checks every segment in order,
then the active file: a missing, reordered, edited or emptied segment breaks the chain like a line.

**Cost.** :class:`AuditLog` verifies the whole log once, when it is opened; each :meth:`AuditLog.append`
then costs the same whatever the log's length: it reads only the lines other processes appended since
its last write (checked against the chain head it holds), never the earlier entries. Checking the whole
log again is :func:`verify_log`'s job (``audit verify-log``, ``audit check``, the next open).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedproxy_secure.errors import ConfigError, ProtocolAbort, SecurityError
from fedproxy_secure.wire.canonical import canonical_json
from fedproxy_secure.wire.codec import b64d, b64e

GENESIS = "0" * 64
_FIELDS = ("seq", "ts", "event", "data", "prev_hash", "hash")
_KEYED_FIELDS = _FIELDS + ("mac",)
MAC_INFO = b"fedproxy-secure/v1/audit-log-hmac"
HEAD_DOMAIN = b"fedproxy-secure/v1/audit-head\n"
HEAD_TYPE = "fedproxy-secure/audit-head/v1"
SECRET_NAME = "audit.secret"
#: "find the key next to the log": ``<log folder>/keys/audit.secret`` when it exists
AUTO = "auto"
#: an active file at or above this many bytes is sealed into a numbered segment before the next append
DEFAULT_SEGMENT_BYTES = 64 << 20


def segment_path(log_path: str | os.PathLike, index: int) -> Path:
    """Where sealed segment ``index`` (1-based) of the log at ``log_path`` lives: ``audit.000001.jsonl``."""
    p = Path(log_path)
    return p.with_name(f"{p.stem}.{int(index):06d}{p.suffix}")


def sealed_segments(log_path: str | os.PathLike) -> list[Path]:
    """The sealed segments of the log at ``log_path``, oldest first (their numbers need not be contiguous:
    :func:`verify_log` says when one is missing)."""
    p = Path(log_path)
    pat = re.compile(rf"^{re.escape(p.stem)}\.(\d{{6}}){re.escape(p.suffix)}$")
    found = []
    if p.parent.is_dir():
        for q in p.parent.iterdir():
            m = pat.match(q.name)
            if m and q.is_file():
                found.append((int(m.group(1)), q))
    return [q for _, q in sorted(found)]


def log_files(log_path: str | os.PathLike) -> list[Path]:
    """Every file of the log at ``log_path`` in chain order: the sealed segments, then the active file."""
    p = Path(log_path)
    return sealed_segments(p) + ([p] if p.is_file() else [])


def derive_audit_key(secret: bytes) -> bytes:
    """The 32-byte HMAC key of the audit log: HKDF-SHA256(secret, info = ``MAC_INFO``).

    Domain-separated, so the server secret never keys anything else directly. Pure."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if len(secret) < 32:
        raise SecurityError(f"audit secret is {len(secret)} bytes; need >= 32")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=MAC_INFO).derive(secret)


def secret_path_for(log_path: str | os.PathLike) -> Path:
    """Where the server secret of the log at ``log_path`` lives: ``<folder>/keys/audit.secret``."""
    return Path(log_path).parent / "keys" / SECRET_NAME


def create_audit_secret(server_dir: str | os.PathLike) -> Path:
    """Create ``server_dir/keys/audit.secret`` (32 random bytes, 0600, never overwritten); the
    audit log of ``server_dir`` is keyed from then on. Returns the path."""
    from fedproxy_secure.artifacts.keyfiles import new_secret_file

    path = Path(server_dir) / "keys" / SECRET_NAME
    new_secret_file(path)
    return path


def resolve_key(log_path: str | os.PathLike, key: bytes | str | None) -> bytes | None:
    """The HMAC key for the log at ``log_path``: ``key`` itself (bytes), None (unkeyed), or with
    ``AUTO`` the key derived from ``<folder>/keys/audit.secret`` if that file exists."""
    if key is None or isinstance(key, bytes):
        return key
    if key != AUTO:
        raise ValueError(f"key: bytes, None or {AUTO!r}")
    sp = secret_path_for(log_path)
    if not sp.exists():
        return None
    from fedproxy_secure.artifacts.keyfiles import read_secret_file

    return derive_audit_key(read_secret_file(sp))


def entry_hash(entry: dict) -> str:
    """SHA-256 hex of the canonical JSON of ``entry`` without its ``hash`` and ``mac`` keys."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "mac")}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def entry_mac(key: bytes, entry: dict) -> str:
    """HMAC-SHA256 hex of the canonical JSON of ``entry`` without its ``mac`` key (covers ``hash``)."""
    body = {k: v for k, v in entry.items() if k != "mac"}
    return hmac.new(key, canonical_json(body), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_log`: ``ok``, lines checked, first bad line (1-based) and why;
    ``keyed``: every MAC was checked; ``anchored``: the log matches a signed head."""

    ok: bool
    lines: int
    bad_line: int | None = None
    reason: str = ""
    last_hash: str = GENESIS
    keyed: bool = False
    anchored: bool = False
    #: the file (a sealed segment or the active file) holding ``bad_line``; "" when it is the log itself
    file: str = ""
    segments: int = 1

    def message(self, path: str | os.PathLike = "") -> str:
        """One human line describing the result."""
        if self.ok:
            how = ("MACs verified" if self.keyed else "hash chain only, no MAC key") + \
                  (", matches the signed head" if self.anchored else "")
            seg = f" in {self.segments} files" if self.segments > 1 else ""
            return f"{path}: OK, {self.lines} entries{seg}, chain head {self.last_hash[:16]} ({how})"
        return f"{self.file or path}: line {self.bad_line}: {self.reason}"


def verify_log(path: str | os.PathLike, expected_head: str | None = None, *, key: bytes | str | None = AUTO,
               head: dict | None = None) -> VerifyResult:
    """Check every line of the log at ``path`` (its sealed segments, then the file itself); return the
    first bad line and the reason.

    Detects edits (hash mismatch), deletions and reorderings (``seq`` gap or ``prev_hash``
    mismatch), malformed lines, a mix of keyed and unkeyed lines, a missing or empty segment, and: with
    a MAC key (``key`` bytes, or found next to the log with ``AUTO``) any line without a valid MAC (a
    rewritten chain); with ``expected_head`` (a hash) a truncated tail; with ``head`` (a signed head
    already checked by :func:`verify_head`) a log whose entry at ``head["index"]`` is not
    ``head["hash"]`` or that ends before it. MACs are compared in constant time. Reads every entry:
    its cost grows with the log (appending does not, see :class:`AuditLog`).
    """
    p = Path(path)
    files = log_files(p)
    if not files:
        return VerifyResult(False, 0, 0, f"no such file {p}")
    mac_key = resolve_key(p, key)
    prev = GENESIS
    n = 0
    keyed_log: bool | None = None
    at_head: str | None = None
    head_index = int(head["index"]) if head is not None else None
    where = ""

    def bad(lineno: int, why: str) -> VerifyResult:
        return VerifyResult(False, n, lineno, why, prev, file=where, segments=len(files))

    for fi, f in enumerate(files):
        where = str(f) if f != p else ""
        sealed = f != p
        if sealed and f != segment_path(p, fi + 1):
            return bad(1, f"segment {fi + 1} is missing ({segment_path(p, fi + 1).name}; found {f.name}): "
                          "a sealed segment was deleted or renamed")
        lineno = 0
        with f.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.endswith(b"\n"):
                    return bad(lineno, "truncated line (no newline)")
                try:
                    entry = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    return bad(lineno, f"not valid JSON ({exc.__class__.__name__})")
                if not isinstance(entry, dict) or set(entry) not in (set(_FIELDS), set(_KEYED_FIELDS)):
                    return bad(lineno, f"fields must be exactly {list(_FIELDS)} (+ mac in a keyed log)")
                has_mac = "mac" in entry
                if keyed_log is None:
                    keyed_log = has_mac
                elif has_mac != keyed_log:
                    return bad(lineno, "keyed and unkeyed lines mixed (a MAC was stripped or a line inserted)")
                if entry["seq"] != n:
                    return bad(lineno, f"seq {entry['seq']!r}, expected {n} (line or segment deleted, inserted "
                                       "or moved)")
                if entry["prev_hash"] != prev:
                    return bad(lineno, "prev_hash does not match the previous line's hash (chain broken)")
                if entry["hash"] != entry_hash(entry):
                    return bad(lineno, "hash does not match the entry's content (line edited)")
                if mac_key is not None:
                    if not has_mac:
                        return bad(lineno, "no MAC, but the log is verified with its key (MACs stripped, or "
                                           "the chain was rewritten)")
                    if not (isinstance(entry["mac"], str)
                            and hmac.compare_digest(entry["mac"], entry_mac(mac_key, entry))):
                        return bad(lineno, "MAC does not verify (entry rewritten without the key)")
                prev = entry["hash"]
                n += 1
                if head_index is not None and entry["seq"] == head_index:
                    at_head = prev
        if sealed and lineno == 0:
            return bad(1, "sealed segment is empty (its entries were removed)")
    where = ""
    if n == 0:
        return VerifyResult(False, 0, 1, "empty log", prev)
    if expected_head is not None and expected_head != prev:
        return VerifyResult(False, n, n + 1, "chain head differs from the expected head (tail truncated)", prev,
                            segments=len(files))
    if head is not None:
        if at_head is None:
            return VerifyResult(False, n, n + 1, f"log has {n} entries but the signed head covers "
                                                 f"{head_index + 1} (tail truncated)", prev, segments=len(files))
        if not hmac.compare_digest(at_head, str(head["hash"])):
            return VerifyResult(False, n, head_index + 1, f"entry {head_index} differs from the signed head "
                                                          "(history rewritten)", prev, segments=len(files))
    return VerifyResult(True, n, None, "", prev, keyed=mac_key is not None, anchored=head is not None,
                        segments=len(files))


def export_head(log_path: str | os.PathLike, signing_key, *, key: bytes | str | None = AUTO,
                clock=time.time) -> dict:
    """A signed head of the log at ``log_path``: ``{type, log, index, entries, hash, time, kid,
    signature}``, Ed25519 by ``signing_key`` (the operator key) over ``HEAD_DOMAIN`` + canonical JSON.

    Verifies the log first (with its MAC key when it has one) and raises SecurityError naming the
    bad line rather than sign a broken log."""
    from fedproxy_secure.artifacts.keys import key_id, sign

    res = verify_log(log_path, key=key)
    if not res.ok:
        raise SecurityError(f"refusing to sign the head of a broken log: {res.message(log_path)}")
    body = {"type": HEAD_TYPE, "log": Path(log_path).name, "index": res.lines - 1, "entries": res.lines,
            "hash": res.last_hash, "time": int(clock()), "keyed": res.keyed, "kid": key_id(signing_key)}
    sig = sign(signing_key, HEAD_DOMAIN, canonical_json(body))
    return {**body, "signature": b64e(sig)}


def verify_head(head: dict, pub) -> dict:
    """Check a signed head against the operator public key ``pub``; returns it without the signature.

    SecurityError for a wrong type, key id, malformed field or signature."""
    from fedproxy_secure.artifacts.keys import key_id, verify_signature

    if not isinstance(head, dict) or head.get("type") != HEAD_TYPE or "signature" not in head:
        raise SecurityError(f"not a signed audit head (type must be {HEAD_TYPE!r})")
    body = {k: v for k, v in head.items() if k != "signature"}
    if body.get("kid") != key_id(pub):
        raise SecurityError(f"audit head signed by unknown key {str(body.get('kid'))[:16]}")
    idx, h = body.get("index"), body.get("hash")
    if not (isinstance(idx, int) and idx >= 0 and isinstance(h, str) and len(h) == 64):
        raise SecurityError("audit head: index must be an integer >= 0 and hash 64 hex characters")
    try:
        sig = b64d(head["signature"], "audit head signature", 1024)
    except ProtocolAbort:
        raise SecurityError("audit head signature is not base64") from None
    if not verify_signature(pub, sig, HEAD_DOMAIN, canonical_json(body)):
        raise SecurityError("audit head signature does not verify")
    return body


def load_head(path: str | os.PathLike, pub) -> dict:
    """Read a head file written by ``audit export-head`` and verify it (:func:`verify_head`)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read audit head {path}: {exc}") from None
    return verify_head(doc, pub)


class AuditLog:
    """Appends hash-chained (and, with a key, HMAC-chained) entries to a JSONL log; safe across
    restarts (resumes the chain) and across processes (each append runs under an exclusive lock on
    the active file and first adopts, after checking them, the lines other writers appended).

    ``key``: the HMAC key (bytes), None for an unkeyed log, or ``AUTO`` (default): keyed iff
    ``<folder>/keys/audit.secret`` exists. ``segment_bytes``: seal the active file into the next
    numbered segment once it holds this many bytes (None: never). Opening an existing log verifies
    every segment first (with the key) and refuses (``SecurityError``) to extend a broken chain, or
    to mix keyed and unkeyed lines. A torn last line left by a crash (no trailing newline) is cut off
    before appending.

    Guarantee: after the open, :meth:`append` never reads an entry written before its own previous
    append (constant cost per entry, whatever the log's length); an earlier entry altered after the
    open is found by :func:`verify_log`, not by the append.
    """

    def __init__(self, path: str | os.PathLike, clock=time.time, key: bytes | str | None = AUTO,
                 segment_bytes: int | None = DEFAULT_SEGMENT_BYTES) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        if segment_bytes is not None and int(segment_bytes) < 1:
            raise ValueError(f"segment_bytes={segment_bytes}: give a positive size or None")
        self._segment_bytes = segment_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = resolve_key(self.path, key)
        self._seq = 0
        self._head = GENESIS
        if self.path.exists() and self.path.stat().st_size > 0:
            self._repair_torn_tail()
        files = log_files(self.path)
        if any(f.stat().st_size > 0 for f in files):
            res = verify_log(self.path, key=self._key)
            if not res.ok:
                raise SecurityError(f"audit log {self.path} fails verification: {res.message(self.path)}; "
                                    "move it aside and investigate before restarting")
            with files[0].open("rb") as fh:
                first = json.loads(fh.readline())
            if ("mac" in first) != (self._key is not None):
                raise SecurityError(f"audit log {self.path} is {'keyed' if 'mac' in first else 'unkeyed'} but was "
                                    f"opened {'with' if self._key is not None else 'without'} a MAC key; keep "
                                    f"{secret_path_for(self.path)} with the log (or move the log aside)")
            self._seq = res.lines
            self._head = res.last_hash
        self._sealed = len(sealed_segments(self.path))
        st = self.path.stat() if self.path.exists() else None
        self._ino: int | None = st.st_ino if st is not None else None
        self._size = st.st_size if st is not None else 0

    def _open_locked(self) -> int:
        """A write descriptor of the current active file, exclusively locked (released by close).

        Retries when the file was sealed (renamed) by another writer between the open and the lock,
        so nobody ever appends to a sealed segment."""
        import fcntl

        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _adopt(self, raw: bytes, where: Path) -> None:
        """Take over lines another process appended: each must extend the chain (seq, prev_hash, hash, MAC)."""
        for line in raw.splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                e = None
            if (not isinstance(e, dict) or e.get("seq") != self._seq or e.get("prev_hash") != self._head
                    or e.get("hash") != entry_hash(e)
                    or (self._key is not None and not hmac.compare_digest(str(e.get("mac")), entry_mac(self._key, e)))):
                raise SecurityError(f"audit log {where}: a line appended by another process does not extend the "
                                    "chain; move the log aside and investigate")
            self._seq, self._head = self._seq + 1, e["hash"]

    def _read(self, path: Path, start: int, end: int | None = None) -> bytes:
        with path.open("rb") as fh:
            fh.seek(start)
            return fh.read() if end is None else fh.read(max(0, end - start))

    def _catch_up(self, fd: int) -> None:
        """Under the lock: adopt the lines other processes appended since our last write (e.g. ``server
        revoke-site`` beside a running server), following them into segments they sealed meanwhile.
        Reads nothing when nobody else wrote."""
        st = os.fstat(fd)
        if st.st_ino == self._ino:
            if st.st_size != self._size:
                self._adopt(self._read(self.path, self._size, st.st_size), self.path)
            self._size = st.st_size
            return
        sealed = sealed_segments(self.path)
        for idx in range(self._sealed + 1, len(sealed) + 1):
            seg = segment_path(self.path, idx)
            if not seg.is_file():
                raise SecurityError(f"audit log {self.path}: segment {seg.name} vanished while appending; "
                                    "move the log aside and investigate")
            start = self._size if self._ino is not None and seg.stat().st_ino == self._ino else 0
            self._adopt(self._read(seg, start), seg)
        self._sealed = len(sealed)
        if st.st_size > 0:
            self._adopt(self._read(self.path, 0, st.st_size), self.path)
        self._ino, self._size = st.st_ino, st.st_size

    def _seal(self) -> None:
        """Under the lock, with every line adopted: rename the active file to the next segment (durably)."""
        target = segment_path(self.path, self._sealed + 1)
        if target.exists():
            raise SecurityError(f"audit log {self.path}: {target.name} already exists; move the log aside and "
                                "investigate")
        os.rename(self.path, target)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._sealed += 1

    def _repair_torn_tail(self) -> None:
        """Cut a last line without its newline (a crash mid-append); reads only the file's tail."""
        with self.path.open("r+b") as fh:
            end = fh.seek(0, os.SEEK_END)
            fh.seek(end - 1)
            if fh.read(1) == b"\n":
                return
            pos, cut = end, 0
            while pos > 0:
                start = max(0, pos - (1 << 16))
                fh.seek(start)
                chunk = fh.read(pos - start)
                i = chunk.rfind(b"\n")
                if i >= 0:
                    cut = start + i + 1
                    break
                pos = start
            fh.truncate(cut)
            fh.flush()
            os.fsync(fh.fileno())

    @property
    def head(self) -> str:
        """Hash of the last entry (``GENESIS`` when empty)."""
        return self._head

    @property
    def entries(self) -> int:
        """Entries in the log as of this writer's last append (or open)."""
        return self._seq

    @property
    def keyed(self) -> bool:
        """True iff entries carry an HMAC."""
        return self._key is not None

    def append(self, event: str, data: dict | None = None) -> dict:
        """Append one entry (with its MAC in a keyed log) and fsync it; returns the entry written.

        Seals the active file first when it has reached ``segment_bytes``."""
        with self._lock:
            fd = self._open_locked()
            try:
                self._catch_up(fd)
                if self._segment_bytes is not None and self._size >= self._segment_bytes:
                    self._seal()
                    os.close(fd)
                    fd = -1
                    fd = self._open_locked()
                    self._catch_up(fd)
                entry = {"seq": self._seq, "ts": round(float(self._clock()), 6), "event": str(event),
                         "data": data or {}, "prev_hash": self._head}
                entry["hash"] = entry_hash(entry)
                if self._key is not None:
                    entry["mac"] = entry_mac(self._key, entry)
                line = canonical_json(entry) + b"\n"
                os.write(fd, line)
                os.fsync(fd)
                self._size = os.fstat(fd).st_size
            finally:
                if fd >= 0:
                    os.close(fd)
            self._seq += 1
            self._head = entry["hash"]
            return entry
