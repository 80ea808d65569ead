"""OpenAI-style JSON error bodies: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import msgspec
from aiohttp import web

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


def error_body(status: int, message: str, code: str | None = None,
               param: str | None = None) -> bytes:
    return msgspec.json.encode({"error": {
        "message": message,
        "type": ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "error"),
        "param": param,
        "code": code,
    }})


def error_response(status: int, message: str, code: str | None = None,
                   param: str | None = None, retry_after: float | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    all_headers = dict(headers or {})
    if retry_after is not None:
        all_headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    return web.Response(status=status, body=error_body(status, message, code, param),
                        content_type="application/json", headers=all_headers)
