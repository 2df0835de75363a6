"""``server start`` as a lifecycle: serve, log every round's stage transitions and results (one line
each), and end in a stored ``finished`` or ``failed`` state.

:func:`federation_state` is the pure rule (used by ``server status`` too): ``finished`` once the
federation's rounds are done; ``failed`` once more than ``max_aborts`` rounds aborted (the reason
names the count and the last round's reason); else ``running`` (or ``not started``). The
:class:`Watcher` polls the store, prints new transitions, and on an end state stores it under the
store meta key ``federation_state`` and stops the server after ``linger_s`` seconds (time for the
sites to read the end state). Exit status of :func:`run_server`: 0 finished, 1 failed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from fedproxy_secure.server.uploads import UploadLimits

META_KEY = "federation_state"
Log = Callable[[str], None]


def federation_state(rounds_total: int, max_aborts: int, rounds: list, stored: dict | None = None) -> dict:
    """``{"state", "reason", "rounds_done", "rounds_total", "aborted"}`` for store rows ``rounds``.

    A stored end state (``stored``, written by the server when it ended) wins: it says why the
    server stopped. Otherwise the state follows the engine's own rule (done >= total: finished;
    aborted > max_aborts: failed).
    """
    done = sum(1 for r in rounds if r.status == "done")
    aborted = [r for r in rounds if r.status == "aborted"]
    base = {"rounds_done": done, "rounds_total": rounds_total, "aborted": len(aborted)}
    if stored and stored.get("state") in ("finished", "failed"):
        return {**base, "state": stored["state"], "reason": stored.get("reason", "")}
    if done >= rounds_total:
        return {**base, "state": "finished", "reason": "every round of the federation is done"}
    if len(aborted) > max_aborts:
        last = aborted[-1]
        return {**base, "state": "failed", "reason": f"{len(aborted)} rounds aborted (more than max_aborts="
                f"{max_aborts}); last: round {last.round_id}: {last.reason}"}
    if not rounds:
        return {**base, "state": "not started", "reason": ""}
    return {**base, "state": "running", "reason": ""}


def stored_state(store) -> dict | None:
    """The end state the server stored, or None."""
    raw = store.get_meta(META_KEY)
    return json.loads(raw) if raw else None


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def round_result_line(row, reports: dict[str, dict], names: dict[str, str]) -> str:
    """One line for a closed round: survivors, norms, mean loss and max ε of the site reports (rounded)."""
    if row.status == "aborted":
        return f"round {row.round_id} aborted: {row.reason}"
    res = row.result or {}
    surv = [names.get(c, c[:8]) for c in res.get("survivors", [])]
    losses = [x["train_loss"] for x in reports.values() if isinstance(x.get("train_loss"), (int, float))]
    eps = [x["epsilon"] for x in reports.values() if isinstance(x.get("epsilon"), (int, float))]
    secs = round((row.closed_at or row.opened_at) - row.opened_at, 1)
    parts = [f"round {row.round_id} done in {secs} s", f"survivors {len(surv)} ({', '.join(sorted(surv))})",
             f"|update| {_num(res.get('delta_norm'))}"]
    if losses:
        parts.append(f"mean loss {_num(sum(losses) / len(losses))}")
    if eps:
        parts.append(f"max ε {_num(max(eps))}")
    return ", ".join(parts)


def transition_line(rid: int, t: dict) -> str | None:
    """One line for a stored stage transition (None for the close record, reported by the result line)."""
    data = t.get("data") or {}
    if t["stage"] in ("done", "aborted"):
        return None
    if data.get("event") == "open":
        return f"round {rid}: open, waiting for sites to join"
    if "cohort" in data:
        return f"round {rid}: cohort of {len(data['cohort'])} fixed (threshold {data.get('threshold')}) -> {t['stage']}"
    if data.get("resumed"):
        return f"round {rid}: resumed at {t['stage']} after a restart"
    dropped = data.get("dropped") or []
    return f"round {rid}: {data.get('closed', '?')} closed -> {t['stage']}" + (
        f" ({len(dropped)} dropped)" if dropped else "")


class Watcher:
    """Follows the store of a running server: logs transitions and results, stores the end state."""

    def __init__(self, store, settings, log: Log, poll_s: float = 0.5) -> None:
        self.store, self.s, self.log, self.poll_s = store, settings, log, poll_s
        self.seen: dict[int, int] = {}
        self.closed: set[int] = set()
        self.end: dict | None = None

    def step(self) -> dict | None:
        """Log what changed since the last call; returns the end state once the federation ended."""
        names = {c["client_id"]: c["name"] for c in self.store.clients()}
        rows = self.store.rounds()
        for row in rows:
            ts = self.store.transitions(row.round_id)
            for t in ts[self.seen.get(row.round_id, 0):]:
                line = transition_line(row.round_id, t)
                if line:
                    self.log(line)
            self.seen[row.round_id] = len(ts)
            if row.status in ("done", "aborted") and row.round_id not in self.closed:
                self.closed.add(row.round_id)
                self.log(round_result_line(row, self.store.client_reports(row.round_id), names))
        st = federation_state(self.s.rounds, self.s.max_aborts, rows)
        if st["state"] in ("finished", "failed") and self.end is None:
            st = {**st, "ended_at": int(time.time())}
            self.store.set_meta(META_KEY, json.dumps(st))
            self.end = st
        return self.end

    def run(self, stop: Callable[[], None], linger_s: float, halt: threading.Event) -> None:
        """Poll until the federation ends, then wait ``linger_s`` and call ``stop`` (or until ``halt``)."""
        while not halt.is_set():
            try:
                end = self.step()
            except Exception as exc:  # the watcher must never take the server down
                self.log(f"status watcher: {exc!r}")
                end = None
            if end is not None:
                self.log(f"federation {end['state'].upper()}: {end['reason']}")
                halt.wait(linger_s)
                stop()
                return
            halt.wait(self.poll_s)


def run_server(d: str | os.PathLike, host: str, port: int, bundle: str | os.PathLike | None = None,
               max_body: int = 64 << 20, uploads: "UploadLimits | None" = None, linger_s: float = 10.0,
               log: Log = print) -> int:
    """Serve the federation of folder ``d`` until it ends (or Ctrl-C); 0 finished, 1 failed, 130 interrupted.

    A federation that had already ended when started is reported and not served again.
    """
    from fedproxy_secure.server.runner import uvicorn_server
    from fedproxy_secure.server.uploads import UploadLimits

    server, ctx = uvicorn_server(d, host, port, bundle, max_body, poll_s=2.0, uploads=uploads or UploadLimits())
    prior = stored_state(ctx.store)
    if prior is not None:
        log(f"federation already {prior['state']}: {prior['reason']} (nothing to serve)")
        return 0 if prior["state"] == "finished" else 1
    watcher = Watcher(ctx.store, ctx.engine.s, log)
    halt = threading.Event()

    def stop() -> None:
        server.should_exit = True

    th = threading.Thread(target=watcher.run, args=(stop, linger_s, halt), daemon=True, name="fed-watcher")
    th.start()
    try:
        server.run()
    finally:
        halt.set()
        th.join(5)
    if watcher.end is None:
        try:
            watcher.step()
        except Exception:  # noqa: BLE001 (best effort on the way out)
            pass
    end = watcher.end
    if end is None:
        log("server stopped before the federation ended (run 'server start' again to resume)")
        return 130
    return 0 if end["state"] == "finished" else 1
