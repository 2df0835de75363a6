"""Audit log segments and the cost of an append.

Segments: the active file is sealed into numbered segments; seq and the hash chain continue across
them; verify_log (and ``audit verify-log``) checks every segment and names the file of a bad line.
Append cost: after the open verified the log, an append reads no earlier entry, so a corrupted
earlier entry goes unnoticed by the append and is found by verify_log (no timing asserts here; the
flat timing is measured by tests/test_serving_load.py, slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedproxy_secure import auditlog as audit_log
from fedproxy_secure.auditlog import AuditLog, canonical_json, sealed_segments, segment_path, verify_log
from fedproxy_secure.errors import SecurityError


def _segmented(tmp_path, n: int = 30, seg: int = 700):
    p = tmp_path / "audit.jsonl"
    log = AuditLog(p, segment_bytes=seg)
    for i in range(n):
        log.append("serve_request", {"site": f"site-{i % 3}", "status": 200, "prompt_tokens": i})
    return p, log


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_segments_continue_the_chain_and_verify_as_one_log(tmp_path):
    p, log = _segmented(tmp_path)
    segs = sealed_segments(p)
    assert len(segs) >= 3 and segs[0] == segment_path(p, 1) and segs[0].name == "audit.000001.jsonl"
    assert all(s.stat().st_size >= 700 for s in segs)  # each sealed once it reached the size
    chain = [e for s in segs + [p] for e in _lines(s)]
    assert [e["seq"] for e in chain] == list(range(30))
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(chain, chain[1:]))
    res = verify_log(p)
    assert res.ok and res.lines == 30 and res.segments == len(segs) + 1 and res.last_hash == log.head
    AuditLog(p, segment_bytes=700).append("x")  # reopening resumes across segments
    assert verify_log(p).ok and verify_log(p).lines == 31


@pytest.mark.parametrize("kind", ["delete-middle", "delete-first", "edit-sealed", "swap", "empty"])
def test_a_tampered_segment_is_found_and_named(tmp_path, kind):
    p, _ = _segmented(tmp_path)
    s1, s2 = segment_path(p, 1), segment_path(p, 2)
    if kind == "delete-middle":
        s2.unlink()
        want = "segment 2 is missing"
    elif kind == "delete-first":
        s1.unlink()
        want = "segment 1 is missing"
    elif kind == "edit-sealed":
        s2.write_text(s2.read_text().replace('"site-', '"SITE-', 1))
        want = "line edited"
    elif kind == "swap":
        a, b = s1.read_bytes(), s2.read_bytes()
        s1.write_bytes(b), s2.write_bytes(a)
        want = "seq"
    else:
        s2.write_bytes(b"")
        want = "empty"
    res = verify_log(p)
    assert not res.ok and want in res.reason, res
    if kind in ("edit-sealed", "empty"):
        assert res.file == str(s2) and str(s2) in res.message(p)
    with pytest.raises(SecurityError):
        AuditLog(p)


def test_two_writers_interleave_across_rotations(tmp_path):
    p = tmp_path / "audit.jsonl"
    a, b = AuditLog(p, segment_bytes=500), AuditLog(p, segment_bytes=500)
    for i in range(24):
        (a if i % 3 else b).append("e", {"i": i})
    res = verify_log(p)
    assert res.ok and res.lines == 24 and res.segments > 3
    assert [e["data"]["i"] for s in sealed_segments(p) + [p] for e in _lines(s)] == list(range(24))


def test_verify_log_command_checks_every_segment(tmp_path):
    p, _ = _segmented(tmp_path)
    cmd = [sys.executable, "-m", "fedproxy_secure.cli.main", "audit", "verify-log", str(p)]
    ok = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ok.returncode == 0 and "30 entries" in ok.stdout, ok.stdout + ok.stderr
    s1 = segment_path(p, 1)
    s1.write_text(s1.read_text().replace('"status":200', '"status":201', 1))
    bad = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bad.returncode == 1 and s1.name in bad.stderr and "line 1" in bad.stderr, bad.stderr


# --------------------------------------------------------------------------- the append reads no earlier entry
def test_append_does_not_notice_a_corrupted_earlier_entry_but_verify_log_does(tmp_path):
    p = tmp_path / "audit.jsonl"
    log = AuditLog(p)
    for i in range(50):
        log.append("serve_request", {"site": "a", "status": 200, "n": i})
    raw = p.read_bytes()
    i = raw.index(b'"n":3,')
    p.write_bytes(raw[:i] + b'"n":8,' + raw[i + 6:])  # entry 3 rewritten in place (same size)
    for _ in range(5):
        log.append("serve_request", {"site": "a", "status": 429})  # the open writer goes on: no re-verification
    res = verify_log(p)
    assert not res.ok and res.bad_line == 4 and "edited" in res.reason
    with pytest.raises(SecurityError, match="line 4"):
        AuditLog(p)  # the next open does verify


def test_append_reads_nothing_unless_another_process_wrote(tmp_path, monkeypatch):
    p = tmp_path / "audit.jsonl"
    log = AuditLog(p, segment_bytes=2000)
    other = AuditLog(p, segment_bytes=2000)  # a second writer (another process), opened now
    reads: list[tuple[str, int, int]] = []
    real = AuditLog._read

    def counting(self, path, start, end=None):
        out = real(self, path, start, end)
        reads.append((path.name, start, len(out)))
        return out

    monkeypatch.setattr(AuditLog, "_read", counting)
    monkeypatch.setattr(audit_log, "verify_log", lambda *a, **k: pytest.fail("an append re-verified the log"))
    for i in range(40):  # several rotations, one writer
        log.append("e", {"i": i})
    assert len(sealed_segments(p)) >= 2 and reads == []  # its own lines are never read back
    size = p.stat().st_size
    theirs = other.append("site_revoked", {"site": "b"})  # the other writer adopts what it had not seen
    reads.clear()
    log.append("e", {"i": 40})
    # only the other writer's one new line is read, starting where this writer's last write ended (in the
    # file it wrote to, which the other writer may have sealed meanwhile)
    assert reads and reads[0][1] == size and all(start == 0 for _, start, _ in reads[1:])
    assert sum(n for _, _, n in reads) == len(canonical_json(theirs)) + 1
    monkeypatch.undo()
    assert verify_log(p).ok and verify_log(p).lines == 42
