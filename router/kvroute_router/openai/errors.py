"""OpenAI-style JSON error bodies: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import msgspec

ERROR_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    499: "request_cancelled",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout",
}


class BadRequestError(ValueError):
    """The body is not a usable OpenAI request (a client fault, HTTP 400); ``param`` names the
    offending field (None: the body as a whole) and ``code`` is the OpenAI error code."""

    def __init__(self, message: str, param: str | None = None,
                 code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def error_body(status: int, message: str, code: str | None = None,
               param: str | None = None) -> bytes:
    return msgspec.json.encode({"error": {
        "message": message,
        "type": ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "error"),
        "param": param,
        "code": code,
    }})
