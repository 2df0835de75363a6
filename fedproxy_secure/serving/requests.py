"""Request bodies of the completion routes (pydantic, validated at the boundary).

Fields OpenAI clients may send that greedy decoding has no use for (``temperature``, ``top_p``,
``user``, ...) are accepted and ignored; the fields below are validated, and a refusal names the field.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

StopArg = Union[str, list[str], None]


def normalise_stop(stop: StopArg) -> list[str]:
    """``stop`` as a list of at most 4 non-empty strings (OpenAI's limit); ValueError otherwise."""
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > 4 or any(not isinstance(s, str) or not s for s in items):
        raise ValueError("stop: give at most 4 non-empty strings")
    return items


class ChatMessage(BaseModel):
    """One chat message of a request (text content only)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1 << 20)


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    stop: StopArg = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        normalise_stop(v)
        return v


class CompletionRequest(_Base):
    """``POST /v1/completions`` body (one prompt)."""

    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("give one prompt (a string or a list of one string)")
            return v[0]
        return v


class ChatRequest(_Base):
    """``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
