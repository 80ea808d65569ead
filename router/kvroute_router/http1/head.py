"""An HTTP/1.x response head: status, framing and headers, and ``host:port`` addresses.

The router's two clients of engines — the scraper's ``GET /metrics``
(:mod:`kvroute_router.scrape.connection`) and the proxy's upstream requests
(:mod:`kvroute_router.http1.client`) — read answers from servers they were configured with,
so only what framing needs is interpreted: the status, ``Content-Length``,
``Transfer-Encoding: chunked``, ``Connection`` and the HTTP version; every header is kept
(lower-cased names, repeated ones joined with ``", "``) for the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_HEAD_BYTES = 64 * 1024
"""A response head longer than this is refused."""


class HTTPFramingError(ValueError):
    """The bytes are not an HTTP/1.x response the client can frame."""


@dataclass(slots=True)
class ResponseHead:
    """What a response head says about its body and its connection."""

    status: int
    length: int | None
    """``Content-Length``; ``None`` when chunked or when the body runs to the close."""
    chunked: bool
    close: bool
    """The connection cannot be used again after this answer."""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def encoding(self) -> str:
        """The body's content coding (lower case, ``""`` for none)."""
        return self.headers.get("content-encoding", "").strip().lower()


def parse_head(head: bytes) -> ResponseHead:
    """The head ``head`` (status line and headers, the final blank line optional)."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1.") or len(rest) < 3 or not rest[:3].isdigit():
        raise HTTPFramingError(f"not an HTTP/1.x answer: {lines[0][:60]!r}")
    status = int(rest[:3])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    length: int | None = None
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    connection = headers.get("connection", "").lower()
    close = ("keep-alive" not in connection) if version == "HTTP/1.0" else "close" in connection
    if status in (204, 304) or 100 <= status < 200:
        length, chunked = 0, False
    elif not chunked and "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise HTTPFramingError(
                f"bad Content-Length {headers['content-length'][:40]!r}") from None
        if length < 0:
            raise HTTPFramingError(f"negative Content-Length {length}")
    if length is None and not chunked:
        close = True  # the body runs to the end of the connection
    return ResponseHead(status, length, chunked, close, headers)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port); port 80 when absent."""
    host, sep, port = address.rpartition(":")
    if not sep or host.endswith(":") or (host.startswith("[") != host.endswith("]")):
        return address.strip("[]"), 80  # no port (or a bare IPv6 address)
    return host.strip("[]"), int(port)


__all__ = ["MAX_HEAD_BYTES", "HTTPFramingError", "ResponseHead", "parse_head", "split_address"]
