"""The OpenAI error shape, as vLLM 0.24 returns it, shared by the simulator and the router."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

# vLLM names the error type after the HTTP status the way the OpenAI SDK names its exceptions.
_ERROR_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def error_type(status: int) -> str:
    """The ``type`` field for an HTTP status."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "InternalServerError" if status >= 500 else "BadRequestError"


def error_body(status: int, message: str, *, param: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` for ``status``."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": status}}


class OpenAIError(Exception):
    """An error that becomes an OpenAI-shaped JSON response with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param)

    def __repr__(self) -> str:
        return f"OpenAIError({self.status} {HTTPStatus(self.status).phrase}: {self.message})"


def is_openai_error(body: bytes) -> bool:
    """Whether ``body`` is JSON of the form ``{"error": {...}}``."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and isinstance(data.get("error"), dict)


def openai_error_bytes(status: int, body: bytes) -> bytes:
    """An upstream error body rewritten into the OpenAI shape, keeping its message when it has one."""
    message = ""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        detail = data.get("detail", data.get("message", data.get("error")))
        message = detail if isinstance(detail, str) else json.dumps(detail) if detail is not None else ""
    elif body:
        message = body.decode("utf-8", "replace")[:500]
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
    return json.dumps(error_body(status, message or phrase)).encode()
