"""Pure parts of ``server serve-model``: settings, per-site token buckets, site identity, prompts, stops.

Nothing here touches the network or a model, so every rule is testable on its own:

- :class:`ServeSettings` (pydantic): rate limits (per site overrides), the ``max_tokens`` cap, body size;
- :class:`RateLimiter`: one token bucket per site identity (capacity ``burst``, refilled at
  ``rate_per_minute``); a refusal says how many seconds until a token is back (``Retry-After``);
- :func:`site_of_certificate`: the site name a client certificate asserts (its single CN);
- :func:`chat_prompt`: the tokenizer's chat template when it has one, else :data:`PLAIN_TEMPLATE_DOC`;
- :func:`cut_at_stop` / :func:`safe_stream_prefix`: ``stop`` strings, also while streaming.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedproxy_secure.errors import ConfigError

#: the prompt used for chat when the tokenizer has no chat template (documented in docs/serving.md)
PLAIN_TEMPLATE_DOC = "one line '<role>: <content>' per message, then 'assistant:' (the model continues after it)"


class SiteLimit(BaseModel):
    """A per-site override of the request rate."""

    model_config = ConfigDict(extra="forbid")
    rate_per_minute: float = Field(gt=0, allow_inf_nan=False)
    burst: int = Field(ge=1)


class ServeSettings(BaseModel):
    """What ``server serve-model`` enforces (validated at the boundary; unknown keys are refused).

    ``rate_per_minute``/``burst``: every site's token bucket unless ``sites`` overrides it;
    ``max_tokens_cap``: the most new tokens one request may ask for (more is a 400 naming the cap);
    ``default_max_tokens``: used when a request gives none; ``max_body``: request body bytes.
    """

    model_config = ConfigDict(extra="forbid")
    rate_per_minute: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    burst: int = Field(default=10, ge=1)
    sites: dict[str, SiteLimit] = Field(default_factory=dict)
    max_tokens_cap: int = Field(default=256, ge=1, le=32768)
    default_max_tokens: int = Field(default=16, ge=1)
    max_body: int = Field(default=1 << 20, ge=1024)
    model_id: Optional[str] = Field(default=None, min_length=1, max_length=128)

    def limit_for(self, site: str) -> SiteLimit:
        """The rate limit of ``site`` (its override, else the default)."""
        return self.sites.get(site) or SiteLimit(rate_per_minute=self.rate_per_minute, burst=self.burst)


def parse_serve_settings(data: Any, source: str = "serve settings") -> ServeSettings:
    """Validate ``data`` into :class:`ServeSettings`; ConfigError naming the field and the fix otherwise."""
    try:
        s = ServeSettings.model_validate(data or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "(root)"
        raise ConfigError(f"{source}: field {field!r}: {err['msg']}; fix it (see docs/serving.md)") from None
    if s.default_max_tokens > s.max_tokens_cap:
        raise ConfigError(f"{source}: default_max_tokens={s.default_max_tokens} exceeds max_tokens_cap="
                          f"{s.max_tokens_cap}; lower it or raise the cap")
    return s


class RateLimiter:
    """Token buckets keyed by site identity; thread-safe; ``clock`` is injectable for tests.

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


def retry_after_header(wait_s: float) -> str:
    """``Retry-After`` value (whole seconds, at least 1) for a wait of ``wait_s`` seconds."""
    return str(max(1, math.ceil(wait_s)))


def site_of_certificate(der: bytes) -> tuple[str, int]:
    """``(site name, serial)`` of a DER client certificate: its single common name and serial number.

    The TLS layer has already checked that the federation CA signed it; this only reads who it names.
    ValueError when it has no or several common names.
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str) or not cns[0].value:
        raise ValueError("client certificate must carry exactly one common name (the site name)")
    return cns[0].value, int(cert.serial_number)


class ChatMessage(BaseModel):
    """One chat message of a request (text content only)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1 << 20)


def chat_prompt(tokenizer: Any, messages: list[ChatMessage]) -> str:
    """The prompt text for ``messages``: the tokenizer's chat template (with the generation prompt)
    when it has one, else the plain template (:data:`PLAIN_TEMPLATE_DOC`)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                             add_generation_prompt=True)
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


StopArg = Union[str, list[str], None]


def normalise_stop(stop: StopArg) -> list[str]:
    """``stop`` as a list of at most 4 non-empty strings (OpenAI's limit); ValueError otherwise."""
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > 4 or any(not isinstance(s, str) or not s for s in items):
        raise ValueError("stop: give at most 4 non-empty strings")
    return items


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``(text before the earliest stop string, True)``, or ``(text, False)`` when none occurs."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def safe_stream_prefix(text: str, stops: list[str]) -> str:
    """The longest prefix of ``text`` that can be sent while streaming: it ends before any suffix of
    ``text`` that could still grow into a stop string, and before a trailing incomplete character."""
    keep = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = min(keep, len(text) - k)
                break
    out = text[:keep]
    return out.rstrip("\ufffd") if out.endswith("\ufffd") else out
