"""The one way a serving route refuses: an HTTP status with OpenAI's error body."""

from __future__ import annotations

from typing import Any


class HTTPError(Exception):
    """A refusal with its HTTP status, OpenAI error type, the request field at fault and optional headers.

    The message names the field and the fix; it never quotes prompt text.
    """

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers or {}

    def body(self) -> dict[str, Any]:
        """OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""
        code = self.kind if self.kind == "insufficient_quota" else None
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": code}}
