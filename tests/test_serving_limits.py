"""serve-model's fairness and bounds without a model: the per-site scheduler, the daily token quota,
today's usage read back from the audit log, and where ``client ask`` takes its question from."""

from __future__ import annotations

import io
import threading
import time

import pytest

from fedproxy_secure.auditlog import AuditLog
from fedproxy_secure.errors import ConfigError
from fedproxy_secure.serving.audit_sink import SERVE_EVENT, AuditSink, tokens_used_since
from fedproxy_secure.serving.limits import DAY_S, QuotaExceeded, TokenQuota
from fedproxy_secure.serving.scheduler import FairScheduler, QueueFull
from fedproxy_secure.serving.settings import parse_serve_settings


class Job:
    """A fake decoding: ``n`` steps, each recorded in ``log`` as (site, name); optional gate before step 1."""

    def __init__(self, log: list, site: str, name: str, n: int, gate: threading.Event | None = None,
                 fail_at: int | None = None, step_tokens: int = 1) -> None:
        self.log, self.site, self.name, self.left, self.gate, self.fail_at = log, site, name, n, gate, fail_at
        self.step_tokens, self.result, self.done_steps = step_tokens, name, 0

    def step(self) -> bool:
        if self.gate is not None:
            assert self.gate.wait(10)
            self.gate = None
        self.done_steps += 1
        if self.fail_at is not None and self.done_steps == self.fail_at:
            raise RuntimeError("boom")
        self.log.append((self.site, self.name))
        time.sleep(0.001)
        self.left -= 1
        return self.left == 0


def test_a_quiet_site_is_served_at_the_next_step_not_after_the_flooders_queue():
    log: list = []
    sch = FairScheduler(max_queued=4)
    started, arrived = threading.Event(), threading.Event()

    class Flood(Job):
        def step(self):
            if len(self.log) == 20:  # the flooder's 21st step waits until the victim's request is queued
                started.set()
                assert arrived.wait(10)
            return super().step()

    flood = [sch.submit("flooder", Flood(log, "flooder", f"f{i}", 200)) for i in range(4)]
    assert started.wait(10)
    victim = sch.submit("victim", Job(log, "victim", "v", 10))
    arrived.set()
    assert victim.result(10) == "v"
    first, last = log.index(("victim", "v")), len(log) - 1 - log[::-1].index(("victim", "v"))
    # it started right after the step in flight and ran its 10 steps back to back (780 flooder steps still queued)
    assert first == 21 and last - first == 9
    assert not flood[-1].done()
    sch.close()


def test_two_busy_sites_share_the_steps_evenly_and_a_full_queue_is_refused():
    log: list = []
    gate = threading.Event()
    sch = FairScheduler(max_queued=3)
    futs = [sch.submit("a", Job(log, "a", "a0", 40, gate=gate))]
    futs += [sch.submit("a", Job(log, "a", f"a{i}", 40)) for i in (1, 2)]
    with pytest.raises(QueueFull, match="'a' already has 3"):
        sch.submit("a", Job(log, "a", "a3", 1))
    futs += [sch.submit("b", Job(log, "b", f"b{i}", 40)) for i in range(3)]
    gate.set()
    for f in futs:
        f.result(20)
    first = log[:120]
    assert abs(sum(s == "a" for s, _ in first) - sum(s == "b" for s, _ in first)) <= 2  # even shares by tokens
    sch.close()


def test_a_failing_step_fails_only_its_request_and_prompt_tokens_are_charged():
    log: list = []
    sch = FairScheduler(max_queued=2)
    bad = sch.submit("a", Job(log, "a", "bad", 5, fail_at=2))
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(10)
    assert sch.submit("a", Job(log, "a", "ok", 2)).result(10) == "ok"  # the worker lives on
    sch.submit("big", Job(log, "big", "p", 1, step_tokens=500)).result(10)
    assert sch.usage("big") > 400 > sch.usage("a")  # a long prompt counts as its tokens, not as one step
    sch.close()


# --------------------------------------------------------------------------- token quota
def test_quota_counts_tokens_per_site_per_utc_day_and_gives_back_unused_tokens():
    now = [10 * DAY_S + 3600.0]
    s = parse_serve_settings({"tokens_per_day": 100, "sites": {"big": {"tokens_per_day": 1000}}})
    q = TokenQuota(s, clock=lambda: now[0], used={"a": 30})  # 30 already used today (from the audit log)
    r = q.reserve("a", 60)  # prompt + max_tokens
    with pytest.raises(QuotaExceeded) as ei:
        q.reserve("a", 20)
    assert ei.value.used == 90 and ei.value.limit == 100 and ei.value.wait_s == pytest.approx(DAY_S - 3600)
    assert "tokens_per_day" in str(ei.value) and "max_tokens" in str(ei.value)
    q.settle(r, 45)  # generated fewer than max_tokens: 15 come back
    assert q.used("a") == 75 and q.reserve("a", 20)
    assert q.reserve("big", 900) and q.used("b") == 0  # per site, with its override
    now[0] += DAY_S  # the next UTC day
    assert q.used("a") == 0 and q.reserve("a", 100)
    q.settle(r, 60)  # a reservation of yesterday settles nothing today
    assert q.used("a") == 100
    unmetered = TokenQuota(parse_serve_settings({"tokens_per_day": None}), clock=lambda: now[0])
    assert unmetered.reserve("a", 10**9).tokens == 10**9


def test_todays_usage_is_read_back_from_the_audit_log_across_segments(tmp_path):
    now = [5 * DAY_S - 100.0]  # yesterday, late
    p = tmp_path / "audit.jsonl"
    log = AuditLog(p, clock=lambda: now[0], segment_bytes=4096)
    log.append(SERVE_EVENT, {"site": "a", "status": 200, "prompt_tokens": 1000, "completion_tokens": 1000})
    now[0] = 5 * DAY_S + 10.0
    for i in range(40):
        log.append(SERVE_EVENT, {"site": "ab"[i % 2], "status": 200, "prompt_tokens": 3, "completion_tokens": 2})
    log.append(SERVE_EVENT, {"site": "a", "status": 429, "prompt_tokens": 0, "completion_tokens": 0})
    log.append("site_revoked", {"site": "a", "prompt_tokens": 99})
    assert len(list(tmp_path.glob("audit.0*.jsonl"))) >= 1
    assert tokens_used_since(p, 5 * DAY_S) == {"a": 100, "b": 100}
    assert AuditSink(p).entries == 43  # opening the sink verified the segmented log


# --------------------------------------------------------------------------- client ask's question
def test_client_ask_reads_the_question_from_a_file_or_stdin_never_argv(tmp_path):
    from typer.testing import CliRunner

    from fedproxy_secure.cli.app import app
    from fedproxy_secure.cli.main import _load_commands
    from fedproxy_secure.cli.serve_model import read_prompt

    f = tmp_path / "q.txt"
    f.write_text("Which ward is quiet?\n")
    assert read_prompt(str(f)) == "Which ward is quiet?"
    assert read_prompt("-", stdin=io.StringIO("from a pipe\n")) == "from a pipe"
    assert read_prompt(None, stdin=io.StringIO("default is stdin")) == "default is stdin"
    for bad, why in ((tmp_path / "missing.txt", "cannot read"), (tmp_path / "empty.txt", "empty")):
        if why == "empty":
            bad.write_text("  \n")
        with pytest.raises(ConfigError, match=f"--prompt-file.*{why}"):
            read_prompt(str(bad))
    big = tmp_path / "big.txt"
    big.write_text("x" * ((1 << 20) + 1))
    with pytest.raises(ConfigError, match="over"):
        read_prompt(str(big))
    _load_commands()
    r = CliRunner().invoke(app, ["client", "ask", "secret question", "--dir", str(tmp_path), "--url", "https://x"])
    assert r.exit_code == 2 and "--prompt-file" in r.output and "ps" in r.output
    assert "secret question" not in r.output
