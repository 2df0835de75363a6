"""Audit log: chain verifies; any edit, deletion, insertion or reordering is caught at its line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedproxy_secure.auditlog import AuditLog, verify_log
from fedproxy_secure.errors import SecurityError


def _make(tmp_path, n=6):
    p = tmp_path / "audit.jsonl"
    log = AuditLog(p)
    for i in range(n):
        log.append("accept", {"round": 1, "client": i, "reason": "ok"})
    return p, log


def test_valid_chain_and_resume(tmp_path):
    p, log = _make(tmp_path)
    res = verify_log(p)
    assert res.ok and res.lines == 6 and res.last_hash == log.head
    log2 = AuditLog(p)  # reopen resumes the chain
    log2.append("round_close", {"round": 1})
    assert verify_log(p).ok and verify_log(p).lines == 7
    assert oct(p.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("kind", ["edit", "delete", "swap", "insert", "garbage"])
def test_tamper_detected_at_first_bad_line(tmp_path, kind):
    p, _ = _make(tmp_path)
    lines = p.read_text().splitlines(keepends=True)
    if kind == "edit":
        e = json.loads(lines[2]); e["data"]["reason"] = "forged"
        lines[2] = json.dumps(e) + "\n"; expect = 3
    elif kind == "delete":
        del lines[3]; expect = 4
    elif kind == "swap":
        lines[1], lines[2] = lines[2], lines[1]; expect = 2
    elif kind == "insert":
        lines.insert(4, lines[2]); expect = 5
    else:
        lines[5] = "not json\n"; expect = 6
    p.write_text("".join(lines))
    res = verify_log(p)
    assert not res.ok and res.bad_line == expect, res
    with pytest.raises(SecurityError):
        AuditLog(p)


def test_truncated_tail_needs_head_and_torn_line_repaired(tmp_path):
    p, log = _make(tmp_path)
    head = log.head
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[:-1]))
    assert verify_log(p).ok  # a cut tail is only visible against a known head
    assert not verify_log(p, expected_head=head).ok
    p.write_text("".join(lines) + '{"seq": 6, "ts"')  # crash mid-append
    log2 = AuditLog(p)
    log2.append("x")
    assert verify_log(p).ok and verify_log(p).lines == 7


def test_cli_verify_log_exit_codes(tmp_path):
    p, _ = _make(tmp_path)
    cmd = [sys.executable, "-m", "fedproxy_secure.cli.main", "audit", "verify-log", str(p)]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    lines = p.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"client":1', '"client":9')
    p.write_text("".join(lines))
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1 and "line 2" in bad.stderr
