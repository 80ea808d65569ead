"""One kept-alive HTTP/1.1 connection per endpoint for its ``/metrics`` page.

Every endpoint is scraped ten times a second, so the client's own cost per GET is paid
continuously, with or without traffic: through ``aiohttp.ClientSession`` a GET of a small
page cost ~250 µs of router CPU (URL and header objects, cookie jar, tracing hooks, timers,
the connection pool), over a plain asyncio stream ~90 µs (docs/benchmarks/router-cpu.md).
The scraper needs one request shape only — ``GET /metrics``, no body, no redirects, no
cookies, no TLS — so this client sends a prebuilt request and reads the answer's status,
``Content-Length`` / chunked / read-to-close body and ``gzip`` coding, nothing else.

A request on a reused connection that fails before any byte of the answer arrived (the
engine closed an idle keep-alive connection) is retried once on a new connection; any other
failure closes the connection and raises :class:`ScrapeHTTPError` (``OSError``), so the
scraper counts the endpoint unreachable as before. Timeouts are the caller's
(``asyncio.timeout`` around :meth:`MetricsConnection.get`); a timed-out request leaves the
connection closed, never half-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib

from kvroute_router.http1.head import MAX_HEAD_BYTES, parse_head, split_address

MAX_BODY_BYTES = 64 * 1024 * 1024
"""A metrics page larger than this is refused (vLLM's is ~50 KB)."""


class ScrapeHTTPError(OSError):
    """The endpoint's answer could not be read (connection refused or cut, bad framing)."""


class MetricsConnection:
    """Keep-alive ``GET path`` against one ``host:port`` (one request at a time)."""

    def __init__(self, address: str, path: str = "/metrics") -> None:
        self.address = address
        self.host, self.port = split_address(address)
        self._request = (f"GET {path} HTTP/1.1\r\nHost: {address}\r\n"
                         "Accept: text/plain\r\nUser-Agent: kvroute-router\r\n\r\n").encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self) -> tuple[int, bytes]:
        """(status, body) of one GET; :class:`ScrapeHTTPError` when it cannot be read."""
        reused = self._writer is not None
        try:
            try:
                return await self._exchange()
            except _StaleConnectionError:
                if not reused:
                    raise
            return await self._exchange()  # the engine dropped an idle connection: once more
        except _StaleConnectionError:
            raise ScrapeHTTPError("the connection closed before an answer") from None
        except BaseException:  # a timeout or cancel included: never leave it half-read
            self.close()
            raise

    async def _exchange(self) -> tuple[int, bytes]:
        try:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(
                    self.host, self.port, limit=MAX_HEAD_BYTES)
            assert self._reader is not None
            self._writer.write(self._request)
            try:
                head = await self._reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    self.close()
                    raise _StaleConnectionError from None
                raise
            except (ConnectionResetError, BrokenPipeError):
                self.close()
                raise _StaleConnectionError from None
            parsed = parse_head(head[:-4])
            status, length, chunked, close = (parsed.status, parsed.length, parsed.chunked,
                                              parsed.close)
            gzip = parsed.encoding == "gzip"
            if parsed.encoding not in ("", "identity", "gzip"):
                raise ScrapeHTTPError(f"unsupported content-encoding {parsed.encoding!r}")
            if chunked:
                body = await self._chunked()
            elif length is not None:
                if length > MAX_BODY_BYTES:
                    raise ScrapeHTTPError(f"a {length}-byte answer is too large")
                body = await self._reader.readexactly(length)
            else:  # no length: the body runs to the end of the connection
                body = await self._reader.read(MAX_BODY_BYTES + 1)
                while len(body) <= MAX_BODY_BYTES and (more := await self._reader.read(
                        MAX_BODY_BYTES + 1 - len(body))):
                    body += more
                if len(body) > MAX_BODY_BYTES:
                    raise ScrapeHTTPError("the answer is too large")
                close = True
        except (_StaleConnectionError, ScrapeHTTPError):
            raise  # get() closes the connection
        except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as exc:
            raise ScrapeHTTPError(f"{type(exc).__name__}: {exc}") from exc
        if close:
            self.close()
        if gzip:
            try:
                body = zlib.decompress(body, wbits=zlib.MAX_WBITS | 16)
            except zlib.error as exc:
                raise ScrapeHTTPError(f"bad gzip body: {exc}") from exc
        return status, body

    async def _chunked(self) -> bytes:
        assert self._reader is not None
        parts: list[bytes] = []
        total = 0
        while True:
            line = await self._reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while await self._reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                raise ScrapeHTTPError("the answer is too large")
            parts.append(await self._reader.readexactly(size))
            if await self._reader.readexactly(2) != b"\r\n":
                raise ScrapeHTTPError("bad chunk framing")

    def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.transport.abort()


class _StaleConnectionError(Exception):
    """The connection ended before the answer's first byte."""


__all__ = ["MetricsConnection", "ScrapeHTTPError", "split_address"]
