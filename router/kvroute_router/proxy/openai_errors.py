"""OpenAI-style error responses of the aiohttp proxy (the body: :func:`error_body`)."""

from __future__ import annotations

from aiohttp import web

from kvroute_router.openai.errors import error_body


def error_response(status: int, message: str, code: str | None = None,
                   param: str | None = None, retry_after: float | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    all_headers = dict(headers or {})
    if retry_after is not None:
        all_headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    return web.Response(status=status, body=error_body(status, message, code, param),
                        content_type="application/json", headers=all_headers)
