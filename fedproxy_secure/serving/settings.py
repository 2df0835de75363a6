"""What ``server serve-model`` enforces, validated at the boundary (``serve.yaml`` and the command's options).

Unknown keys are refused; every error names the field and the fix (:func:`parse_serve_settings`).
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedproxy_secure.errors import ConfigError

#: the active audit file is sealed into a numbered segment at this size (``audit_segment_bytes``)
DEFAULT_AUDIT_SEGMENT_BYTES = 64 << 20


class SiteLimit(BaseModel):
    """A per-site override; a field left out takes the server-wide value."""

    model_config = ConfigDict(extra="forbid")
    rate_per_minute: Optional[float] = Field(default=None, gt=0, allow_inf_nan=False)
    burst: Optional[int] = Field(default=None, ge=1)
    tokens_per_day: Optional[int] = Field(default=None, ge=1)


class EffectiveLimit(BaseModel):
    """The limits that apply to one site (its override merged over the server-wide values)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rate_per_minute: float
    burst: int
    #: None: no daily token quota
    tokens_per_day: Optional[int]


class ServeSettings(BaseModel):
    """What ``server serve-model`` enforces (validated at the boundary; unknown keys are refused).

    ``rate_per_minute``/``burst``: every site's request bucket unless ``sites`` overrides it;
    ``tokens_per_day``: prompt + completion tokens one site may use per UTC day (None: unmetered);
    ``max_queued_per_site``: requests of one site waiting or decoding at once (more is a 429);
    ``max_tokens_cap``: the most new tokens one request may ask for (more is a 400 naming the cap);
    ``default_max_tokens``: used when a request gives none; ``max_body``: request body bytes;
    ``audit_segment_bytes``: size at which the audit log's active file is sealed into a segment.
    """

    model_config = ConfigDict(extra="forbid")
    rate_per_minute: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    burst: int = Field(default=10, ge=1)
    tokens_per_day: Optional[int] = Field(default=100_000, ge=1)
    max_queued_per_site: int = Field(default=4, ge=1, le=1024)
    sites: dict[str, SiteLimit] = Field(default_factory=dict)
    max_tokens_cap: int = Field(default=256, ge=1, le=32768)
    default_max_tokens: int = Field(default=16, ge=1)
    max_body: int = Field(default=1 << 20, ge=1024)
    audit_segment_bytes: int = Field(default=DEFAULT_AUDIT_SEGMENT_BYTES, ge=4096)
    model_id: Optional[str] = Field(default=None, min_length=1, max_length=128)

    def limit_for(self, site: str) -> EffectiveLimit:
        """The limits of ``site``: its override's fields, else the server-wide ones."""
        o = self.sites.get(site) or SiteLimit()
        return EffectiveLimit(
            rate_per_minute=o.rate_per_minute if o.rate_per_minute is not None else self.rate_per_minute,
            burst=o.burst if o.burst is not None else self.burst,
            tokens_per_day=o.tokens_per_day if o.tokens_per_day is not None else self.tokens_per_day)


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
