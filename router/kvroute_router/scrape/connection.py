"""One kept-alive HTTP/1.1 connection per endpoint for its ``/metrics`` page.

Every endpoint is scraped ten times a second, so the client's own cost per GET is paid
continuously, with or without traffic: through ``aiohttp.ClientSession`` a GET of a small
page cost ~250 µs of router CPU (URL and header objects, cookie jar, tracing hooks, timers,
the connection pool), over a plain asyncio stream ~90 µs (docs/benchmarks/router-cpu.md).
The scraper needs one request shape only — ``GET /metrics``, no body, no redirects, no
cookies, no TLS — which the proxy's upstream client (:mod:`kvroute_router.http1.client`)
sends as well as a POST (with ``Content-Length: 0``, which servers accept): the answer's
framing (``Content-Length`` / chunked / read-to-close) has one home there;
this module adds the page limit and the ``gzip`` coding.

A request on a reused connection that fails before any byte of the answer arrived (the
engine closed an idle keep-alive connection) is retried once on a new connection (the
client's rule); any other failure closes the connection and raises :class:`ScrapeHTTPError`
(``OSError``), so the scraper counts the endpoint unreachable as before. Timeouts are the
caller's (``asyncio.timeout`` around :meth:`MetricsConnection.get`); a timed-out request
leaves the connection closed, never half-read.
"""

from __future__ import annotations

import zlib

from kvroute_router.http1.client import ConnectionPool, request_bytes
from kvroute_router.http1.head import split_address

MAX_BODY_BYTES = 64 * 1024 * 1024
"""A metrics page larger than this is refused (vLLM's is ~50 KB)."""
_HEADERS = (("Accept", "text/plain"), ("User-Agent", "kvroute-router"))


class ScrapeHTTPError(OSError):
    """The endpoint's answer could not be read (connection refused or cut, bad framing)."""


class MetricsConnection:
    """Keep-alive ``GET path`` against one ``host:port`` (one request at a time)."""

    def __init__(self, address: str, path: str = "/metrics") -> None:
        self.address = address
        self._pool = ConnectionPool()
        self.path = path

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, path: str) -> None:
        """The page GET asks for (the scraper falls back to vLLM's whole page); the request's
        bytes are built here, once, rather than for each scrape."""
        self._path = path
        self._request = request_bytes("GET", self.address, path, _HEADERS)

    async def get(self) -> tuple[int, bytes]:
        """(status, body) of one GET; :class:`ScrapeHTTPError` when it cannot be read."""
        try:
            response = await self._pool.send(self.address, self._request)
        except TimeoutError:
            raise  # connecting took too long: the caller's timeout handling
        except OSError as exc:  # refused, cut, not HTTP
            raise ScrapeHTTPError(str(exc)) from exc
        try:  # released in any case: a timeout or cancel aborts a half-read connection
            encoding = response.encoding
            if encoding not in ("", "identity", "gzip"):
                raise ScrapeHTTPError(f"unsupported content-encoding {encoding!r}")
            if (response.length or 0) > MAX_BODY_BYTES:
                raise ScrapeHTTPError(f"a {response.length}-byte answer is too large")
            try:
                body = await response.read(MAX_BODY_BYTES + 1)
            except OSError as exc:
                raise ScrapeHTTPError(str(exc)) from exc
        finally:
            response.release()
        if len(body) > MAX_BODY_BYTES:
            raise ScrapeHTTPError("the answer is too large")
        if encoding == "gzip":
            try:
                body = zlib.decompress(body, wbits=zlib.MAX_WBITS | 16)
            except zlib.error as exc:
                raise ScrapeHTTPError(f"bad gzip body: {exc}") from exc
        return response.status, body

    def close(self) -> None:
        self._pool.close()
        self._pool = ConnectionPool()


__all__ = ["MetricsConnection", "ScrapeHTTPError", "split_address"]
