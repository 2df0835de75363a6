"""The one strict base model for every pydantic schema the SDK reads (configs, settings, threat models).

:class:`StrictModel` refuses unknown keys (a typo is an error naming the key, never a silently
ignored setting) and is frozen (a validated config cannot be changed afterwards; derive a new one
with ``model_copy(update=...)``). Imports nothing of the SDK, so any layer may use it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """A pydantic model that forbids extra fields and is immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)
