"""One decoding worker shared fairly by the sites: a queue per site, one token step at a time.

The model decodes one request step at a time (one forward). :class:`FairScheduler` keeps a FIFO
queue per site and, before every step, picks the site that used the fewest tokens recently
(prompt tokens at the first step of a request, one per generated token; exponentially decayed with
half-life ``half_life_s``) and advances the request at the head of that site's queue by one step.

Guarantees:

- **No site starves another.** A request of a site that has been quiet starts at the next step
  boundary (one token of another request, not that request's whole generation), and while several
  sites have work their shares of steps even out by tokens used; a site whose queue is full cannot
  delay the others any more than a site with one request.
- **Bounded.** At most ``max_queued`` requests per site are waiting or decoding; :meth:`submit`
  raises :class:`QueueFull` beyond that (a 429 for the site, nobody else notices), and only the head
  request of each site holds a KV cache.
- A request's tokens are unaffected by the interleaving (each keeps its own cache; see
  :mod:`fedproxy_secure.serving.generation`). The steps run on one daemon thread, so the model is
  never used by two threads at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable, Protocol


class Steppable(Protocol):
    """A unit of work advanced one step at a time (e.g. :class:`~fedproxy_secure.serving.generation.Decoding`)."""

    step_tokens: int
    result: object

    def step(self) -> bool:
        """Advance by one step; True when finished."""


class QueueFull(Exception):
    """The site already has ``limit`` requests waiting or decoding."""

    def __init__(self, site: str, limit: int) -> None:
        super().__init__(f"site {site!r} already has {limit} requests queued or running (max_queued_per_site); "
                         "wait for an answer before sending more")
        self.site, self.limit = site, limit


class FairScheduler:
    """Per-site FIFO queues served one step at a time by the least-recently-served site (see module doc)."""

    def __init__(self, max_queued: int, half_life_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_queued < 1 or half_life_s <= 0:
            raise ValueError("max_queued must be >= 1 and half_life_s > 0")
        self._max, self._half, self._clock = int(max_queued), float(half_life_s), clock
        self._queues: dict[str, deque[tuple[int, Steppable, Future]]] = {}
        self._usage: dict[str, tuple[float, float]] = {}  # site -> (decayed tokens, at time)
        self._cv = threading.Condition()
        self._arrivals = 0
        self._worker: threading.Thread | None = None
        self._closed = False
        self.steps = 0

    def usage(self, site: str) -> float:
        """The site's recent tokens (decayed to now)."""
        with self._cv:
            return self._usage_now(site, self._clock())

    def _usage_now(self, site: str, now: float) -> float:
        v, t = self._usage.get(site, (0.0, now))
        return v * 0.5 ** ((now - t) / self._half)

    def queued(self, site: str) -> int:
        """Requests of ``site`` waiting or decoding."""
        with self._cv:
            return len(self._queues.get(site, ()))

    def submit(self, site: str, job: Steppable) -> Future:
        """Queue ``job`` for ``site``; a Future of ``job.result`` (or of the exception its step raised).

        QueueFull when the site already has ``max_queued`` requests; never blocks."""
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            q = self._queues.setdefault(site, deque())
            if len(q) >= self._max:
                raise QueueFull(site, self._max)
            self._arrivals += 1
            q.append((self._arrivals, job, fut))
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="fedproxy-serve-decode", daemon=True)
                self._worker.start()
            self._cv.notify()
        return fut

    def _pick(self) -> tuple[str, Steppable, Future] | None:
        now = self._clock()
        best = None
        for site, q in self._queues.items():
            if q:
                key = (self._usage_now(site, now), q[0][0])
                if best is None or key < best[0]:
                    best = (key, site)
        if best is None:
            return None
        site = best[1]
        _, job, fut = self._queues[site][0]
        return site, job, fut

    def _run(self) -> None:
        while True:
            with self._cv:
                picked = self._pick()
                while picked is None and not self._closed:
                    self._cv.wait()
                    picked = self._pick()
                if picked is None:
                    return
            site, job, fut = picked
            err: BaseException | None = None
            try:
                done = job.step()
            except BaseException as exc:  # noqa: BLE001 (handed to the waiting request, never kills the worker)
                done, err = True, exc
            with self._cv:
                now = self._clock()
                self._usage[site] = (self._usage_now(site, now) + max(1, int(getattr(job, "step_tokens", 1))), now)
                self.steps += 1
                if done:
                    self._queues[site].popleft()
            if done:
                if err is not None:
                    fut.set_exception(err)
                else:
                    fut.set_result(job.result)

    def close(self) -> None:
        """Stop the worker once every queued request has finished."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
