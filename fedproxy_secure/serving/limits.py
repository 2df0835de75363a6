"""Per-site limits of ``serve-model``: a request-rate bucket and a daily token quota.

- :class:`RateLimiter`: one token bucket per site (capacity ``burst``, refilled at ``rate_per_minute``)
  against bursts of requests; a refusal says how many seconds until a request is allowed again;
- :class:`TokenQuota`: prompt + completion tokens per site per UTC day. A request reserves its prompt
  tokens plus its ``max_tokens`` before it is queued (so concurrent requests cannot overshoot the
  quota) and gives back what it did not generate when it ends.

Both are thread-safe, keyed by the site identity of the client certificate, and take an injectable
clock for tests. One site's use never spends another site's allowance.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from fedproxy_secure.serving.settings import ServeSettings

DAY_S = 86_400


def retry_after_header(wait_s: float) -> str:
    """``Retry-After`` value (whole seconds, at least 1) for a wait of ``wait_s`` seconds."""
    return str(max(1, math.ceil(wait_s)))


class RateLimiter:
    """Request token buckets keyed by site identity.

    Guarantees: a site may make at most ``burst`` requests at once and ``rate_per_minute`` on
    average; one site's requests never spend another site's tokens.
    """

    def __init__(self, settings: ServeSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings, self._clock = settings, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # site -> (tokens, last refill time)
        self._lock = threading.Lock()

    def try_acquire(self, site: str) -> float:
        """Spend one token of ``site``: 0.0 when allowed, else the seconds until the next token (> 0)."""
        lim = self._settings.limit_for(site)
        rate = lim.rate_per_minute / 60.0
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.get(site, (float(lim.burst), now))
            tokens = min(float(lim.burst), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[site] = (tokens - 1.0, now)
                return 0.0
            self._buckets[site] = (tokens, now)
            return (1.0 - tokens) / rate


class QuotaExceeded(Exception):
    """The site's daily token quota cannot cover the request; ``wait_s``: seconds to the next UTC day."""

    def __init__(self, site: str, need: int, used: int, limit: int, wait_s: float) -> None:
        super().__init__(f"site {site!r} has used {used} of its {limit} tokens today (UTC); this request needs up to "
                         f"{need} (prompt + max_tokens): lower max_tokens, wait for the next UTC day, or ask the "
                         "operator for a higher tokens_per_day")
        self.site, self.need, self.used, self.limit, self.wait_s = site, need, used, limit, wait_s


@dataclass(frozen=True)
class Reservation:
    """Tokens set aside for one request on one UTC day (give it back with :meth:`TokenQuota.settle`)."""

    site: str
    day: int
    tokens: int


class TokenQuota:
    """Prompt + completion tokens per site per UTC day (``tokens_per_day``; None: unmetered, still counted).

    Guarantees: the tokens reserved and used by one site on one UTC day never exceed its
    ``tokens_per_day``; the count starts from ``used`` (what the audit log shows for today, so a restart
    does not reset it) and resets at 00:00 UTC.
    """

    def __init__(self, settings: ServeSettings, clock: Callable[[], float] = time.time,
                 used: dict[str, int] | None = None) -> None:
        self._settings, self._clock = settings, clock
        self._lock = threading.Lock()
        self._day = int(clock() // DAY_S)
        self._used: dict[str, int] = dict(used or {})

    def _roll(self) -> int:
        day = int(self._clock() // DAY_S)
        if day != self._day:
            self._day, self._used = day, {}
        return day

    def used(self, site: str) -> int:
        """Tokens ``site`` has used or reserved today."""
        with self._lock:
            self._roll()
            return self._used.get(site, 0)

    def reserve(self, site: str, tokens: int) -> Reservation:
        """Set ``tokens`` aside for ``site``; QuotaExceeded when its quota for today cannot cover them."""
        limit = self._settings.limit_for(site).tokens_per_day
        with self._lock:
            day = self._roll()
            used = self._used.get(site, 0)
            if limit is not None and used + tokens > limit:
                raise QuotaExceeded(site, tokens, used, limit, (day + 1) * DAY_S - self._clock())
            self._used[site] = used + tokens
            return Reservation(site, day, int(tokens))

    def settle(self, r: Reservation, actual: int) -> None:
        """The request of ``r`` used ``actual`` tokens: give back the rest (no-op once its day is over)."""
        with self._lock:
            if self._roll() == r.day:
                self._used[r.site] = max(0, self._used.get(r.site, 0) - r.tokens + int(actual))
