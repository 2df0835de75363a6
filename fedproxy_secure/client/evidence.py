"""The site's evidence: every signed config and protocol message it acted on, append-only in its state folder.

Why. The server holds the round-config key, so it can sign two different configs for one round
and send each to different sites (equivocation). The key agreement makes the sites abort
(:mod:`fedproxy_secure.wire.binding`), but proving *who* did it needs the signed configs
themselves: two operator-signed configs with the same round id and different contents are proof,
because only the holder of the round-config key can make them.

What is kept (``state_dir/evidence.jsonl``, 0600, opened ``O_APPEND``, fsync'ed per entry):

* ``round_config``: the signed round config exactly as received (signature included), with the
  outcome (accepted, or the refusal reason) and its digest;
* ``server_message``: each stage's server message as received (operator-signed SA-H-TIES phase
  messages always in full; others in full up to :data:`MAX_INLINE` bytes, else their SHA-256 and
  size: an HE aggregate carrying every envelope is large and is ciphertext anyway);
* ``sent``: the SHA-256 and size of what the site answered at each stage (never the content);
* ``abort``: why the site left a round.

Each line is canonical JSON with ``seq``, ``prev`` (the previous line's ``hash``) and ``hash`` =
SHA-256 over a domain label and the canonical entry without ``hash``: editing, dropping or
reordering a line breaks the chain at that line. Appending reads only the file's last line.

:func:`export_evidence` (``client evidence export``) writes what an auditor needs, signed with the
site's identity key; :func:`find_equivocation` (``audit evidence``) takes exports from several sites,
checks every signature, and names each round for which the operator key signed different configs.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from fedproxy_secure.errors import SecurityError
from fedproxy_secure.wire.canonical import canonical_json
from fedproxy_secure.wire.codec import b64d, b64e

__all__ = ["EVIDENCE_FILE", "EXPORT_FORMAT", "EXPORT_DOMAIN", "MAX_INLINE", "EvidenceLog", "verify_chain",
           "export_evidence", "verify_export", "find_equivocation"]

EVIDENCE_FILE = "evidence.jsonl"
EXPORT_FORMAT = "fedproxy-secure/site-evidence/v1"
EXPORT_DOMAIN = b"fedproxy-secure/v1/site-evidence-export\n"
CHAIN_LABEL = b"fedproxy-secure/v1/site-evidence-entry\n"
GENESIS = "0" * 64
#: server messages larger than this (canonical JSON bytes) are kept as their SHA-256 and size
MAX_INLINE = 1 << 20
_TAIL = 1 << 16


def _entry_hash(entry: dict) -> str:
    return hashlib.sha256(CHAIN_LABEL + canonical_json({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def _last_line(path: Path) -> bytes | None:
    """The file's last complete line (reads only its tail)."""
    size = path.stat().st_size
    if size == 0:
        return None
    with open(path, "rb") as fh:
        step = _TAIL
        while True:
            start = max(0, size - step)
            fh.seek(start)
            chunk = fh.read(size - start)
            lines = chunk.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or start == 0:
                return lines[-1]
            step *= 2


def _is_operator_signed(msg: Any) -> bool:
    return isinstance(msg, dict) and "kid" in msg and "signature" in msg


class EvidenceLog:
    """Append-only hash-chained evidence of one site (``state_dir/evidence.jsonl``); thread-safe."""

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.path = Path(state_dir) / EVIDENCE_FILE
        self._lock = threading.Lock()

    def _head(self) -> tuple[int, str]:
        if not self.path.exists():
            return 0, GENESIS
        last = _last_line(self.path)
        if last is None:
            return 0, GENESIS
        try:
            e = json.loads(last)
            return int(e["seq"]), str(e["hash"])
        except (ValueError, KeyError, TypeError):
            raise SecurityError(f"{self.path}: the last evidence line is damaged; keep the file for the auditor "
                                "and move it aside to start a new one") from None

    def append(self, kind: str, round_id: int | None, data: dict) -> dict:
        """Append one entry and fsync; returns it (with ``seq``, ``prev`` and ``hash``)."""
        with self._lock:
            seq, prev = self._head()
            entry = {"seq": seq + 1, "at": int(time.time()), "kind": kind, "round": round_id, "data": data,
                     "prev": prev}
            entry["hash"] = _entry_hash(entry)
            line = canonical_json(entry) + b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            return entry

    def round_config(self, round_id: int, signed: Any, outcome: str) -> None:
        """Keep a signed round config as received, and what the site did with it."""
        from fedproxy_secure.wire.binding import round_config_digest

        digest = None
        if isinstance(signed, dict):
            try:
                digest = round_config_digest(signed).hex()
            except Exception:  # an unencodable config is kept as received; its digest stays unknown
                digest = None
        self.append("round_config", round_id, {"config": signed, "digest": digest, "outcome": outcome[:500]})

    def server_message(self, round_id: int, stage: str, msg: Any) -> None:
        """Keep a stage's server message (in full if operator-signed or small, else its digest)."""
        body = canonical_json(msg)
        data: dict = {"stage": stage, "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
        if _is_operator_signed(msg) or len(body) <= MAX_INLINE:
            data["message"] = msg
        self.append("server_message", round_id, data)

    def sent(self, round_id: int, stage: str, msg: Any) -> None:
        """Keep the digest and size of what the site answered (never the content)."""
        body = canonical_json(msg)
        self.append("sent", round_id, {"stage": stage, "sha256": hashlib.sha256(body).hexdigest(),
                                       "size": len(body)})

    def abort(self, round_id: int, stage: str | None, reason: str) -> None:
        """Keep why the site left a round."""
        self.append("abort", round_id, {"stage": stage, "reason": reason[:500]})

    def entries(self) -> list[dict]:
        """Every entry, in order (no checks; see :func:`verify_chain`)."""
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_bytes().splitlines() if x.strip()]


def verify_chain(entries: Iterable[dict]) -> tuple[bool, str]:
    """``(True, "")`` if ``entries`` form an unbroken chain from the genesis, else ``(False, why)``."""
    prev, seq = GENESIS, 0
    for e in entries:
        if not isinstance(e, dict) or e.get("seq") != seq + 1 or e.get("prev") != prev:
            return False, f"entry {seq + 1}: sequence or link broken"
        if e.get("hash") != _entry_hash(e):
            return False, f"entry {seq + 1}: hash does not match its content"
        prev, seq = e["hash"], e["seq"]
    return True, ""


def export_evidence(state_dir: str | os.PathLike, enrol_dir: str | os.PathLike) -> dict:
    """What an auditor needs from this site, signed with its identity key (``client evidence export``).

    Holds the site's identity public key and fingerprint, the pinned operator public key, every
    evidence entry, and the chain check. Raises ``SecurityError`` if the chain is broken (the
    auditor gets the file as it is with :func:`EvidenceLog.entries`, never a silently repaired one).
    """
    from fedproxy_secure.artifacts.keys import load_private_key, load_public_key, sign
    from fedproxy_secure.protocol.roster import identity_fingerprint

    state, enrol = Path(state_dir), Path(enrol_dir)
    key = load_private_key(state / "identity.key")
    raw = key.public_key().public_bytes_raw()
    op = load_public_key(enrol / "operator.pub").public_bytes_raw()
    entries = EvidenceLog(state).entries()
    ok, why = verify_chain(entries)
    if not ok:
        raise SecurityError(f"{state / EVIDENCE_FILE}: {why}; hand the file itself to the auditor")
    rec = state / "enrolment.json"
    client_id = json.loads(rec.read_text())["client_id"] if rec.exists() else None
    body = {"format": EXPORT_FORMAT, "exported_at": int(time.time()), "client_id": client_id,
            "identity_public_key": b64e(raw), "fingerprint": identity_fingerprint(raw),
            "operator_public_key": b64e(op), "entries": entries}
    return {**body, "signature": b64e(sign(key, EXPORT_DOMAIN, canonical_json(body)))}


def verify_export(export: dict) -> dict:
    """Check an export's site signature and chain; returns it without the signature, else ``SecurityError``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from fedproxy_secure.artifacts.keys import verify_signature

    if not isinstance(export, dict) or export.get("format") != EXPORT_FORMAT or "signature" not in export:
        raise SecurityError(f"not a site evidence export ({EXPORT_FORMAT})")
    body = {k: v for k, v in export.items() if k != "signature"}
    pub = Ed25519PublicKey.from_public_bytes(b64d(body.get("identity_public_key"), "identity_public_key", 32))
    if not verify_signature(pub, b64d(export["signature"], "export signature", 64), EXPORT_DOMAIN,
                            canonical_json(body)):
        raise SecurityError(f"evidence export of {body.get('client_id')!r}: the site's signature does not verify")
    ok, why = verify_chain(body.get("entries") or [])
    if not ok:
        raise SecurityError(f"evidence export of {body.get('client_id')!r}: {why}")
    return body


def find_equivocation(exports: Iterable[dict]) -> list[dict]:
    """Rounds for which the operator key signed more than one round config, across site exports.

    Every export's site signature and chain are checked (``SecurityError`` otherwise), all exports
    must pin the same operator key, and only configs whose operator signature verifies count. Returns
    one record per equivocated round: ``{round, digests: {digest: [client ids]}, configs: {digest:
    signed config}}``; an empty list means no equivocation in what the sites kept.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from fedproxy_secure.wire.binding import round_config_digest
    from fedproxy_secure.protocol.roundcfg import verify_round_config

    seen: dict[int, dict[str, dict]] = {}
    who: dict[int, dict[str, set]] = {}
    op_key = None
    for ex in exports:
        body = verify_export(ex)
        if op_key is None:
            op_key = body["operator_public_key"]
        elif body["operator_public_key"] != op_key:
            raise SecurityError("the exports pin different operator keys: compare them per federation")
        pub = Ed25519PublicKey.from_public_bytes(b64d(op_key, "operator_public_key", 32))
        for e in body["entries"]:
            if e.get("kind") != "round_config" or not isinstance(e["data"].get("config"), dict):
                continue
            signed = e["data"]["config"]
            try:
                verify_round_config(pub, signed)
            except SecurityError:
                continue  # not signed by the operator key: no evidence against it
            rid, d = signed.get("round_id"), round_config_digest(signed).hex()
            seen.setdefault(rid, {})[d] = signed
            who.setdefault(rid, {}).setdefault(d, set()).add(body.get("client_id") or body["fingerprint"][:16])
    return [{"round": rid, "digests": {d: sorted(map(str, who[rid][d])) for d in cfgs}, "configs": cfgs}
            for rid, cfgs in sorted(seen.items(), key=lambda kv: str(kv[0])) if len(cfgs) > 1]
