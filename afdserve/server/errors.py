"""Errors the HTTP API returns, each with its status and OpenAI-shaped body.

The body is `{"error": {"message", "type", "param", "code"}}` with `code` the HTTP status, as
vLLM's OpenAI server answers, so the official `openai` client raises its matching exception
(BadRequestError, AuthenticationError, NotFoundError, RateLimitError,
InternalServerError, ...).
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered to the client; subclasses fix the status and type."""

    status: int = 500
    type: str = "InternalServerError"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers: dict[str, str] = {}
        """HTTP headers the error's response carries (a 429's Retry-After)."""

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }


class BadRequest(APIError):
    status, type = 400, "BadRequestError"


class NotFound(APIError):
    status, type = 404, "NotFoundError"


class Conflict(APIError):
    """The group's state refuses an admin request now (errors.StateConflict)."""

    status, type = 409, "ConflictError"


class QueueFull(APIError):
    """--max-queue requests already wait beyond the batch slots: try again later, after the
    `Retry-After` seconds it carries (server/queue_limit.py)."""

    status, type = 429, "RateLimitError"

    def __init__(self, message: str, retry_after_s: int, param: str | None = None) -> None:
        super().__init__(message, param)
        self.headers["Retry-After"] = str(int(retry_after_s))


class EngineDead(APIError):
    """The engine failed (a worker is down) or is shutting down: nothing can be served."""

    status, type = 503, "ServiceUnavailableError"


class InternalError(APIError):
    status, type = 500, "InternalServerError"


class Unauthorized(APIError):
    """A /v1 route without `Authorization: Bearer KEY` for one of the server's --api-key."""

    status, type = 401, "AuthenticationError"


class PayloadTooLarge(APIError):
    """A request body over --max-request-bytes."""

    status, type = 413, "PayloadTooLargeError"
