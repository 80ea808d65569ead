"""Pooled HTTP/1.1 requests to engines, with the answer's body streamed as it arrives.

The proxy's hop to an engine was an ``aiohttp.ClientSession.post``: per request a URL object,
header multidicts, a cookie jar pass, tracing hooks, timer contexts and a ``StreamReader``
that every body chunk crosses before the relaying task wakes: ~130 µs of CPU per request
against this client's ~40 (``bench/upstream_client.py``; docs/benchmarks/router-cpu.md,
*Round 6*). The router needs one shape of
request only — a ``POST`` of a JSON body, no redirects, no cookies, no proxies, no TLS (engines
are reached on the pod network; a mesh adds mTLS outside the process) — so this client writes
the request in one ``transport.write`` and parses the answer in its protocol's
``data_received``: the head, then the body as ``Content-Length``, chunked or read-to-close,
handed to the reader as decoded pieces. The scraper's ``GET /metrics`` goes through it too
(``scrape/connection.py``), so the body framing has this one home.

Semantics the proxy relies on:

* **Connections** are kept alive per ``host:port`` and reused last-in, first-out; one that the
  engine closed while idle (its keep-alive timeout) is noticed by ``connection_lost`` and never
  handed out, and one idle longer than ``idle_timeout_s`` is closed. A request on a reused
  connection that ends before any byte of the answer (the engine closed it at the same moment)
  is sent once more on a new connection: nothing reached the engine's handler.
* **Failures** are :class:`UpstreamConnectError` (nothing listens, the address does not
  resolve) and :class:`UpstreamBrokenError` (the connection was cut or the answer is not
  HTTP/1.x); both are ``OSError``. Connecting longer than ``connect_timeout_s`` raises
  ``TimeoutError``. Other timeouts are the caller's (``asyncio.timeout`` around the calls).
* **Release**: :meth:`UpstreamResponse.release` returns the connection to the pool only when
  the whole answer was read and both sides keep it alive; otherwise (an unread body, a
  cancelled reader, a client gone) the connection is aborted, which is how an engine learns
  to stop generating.
* **Back-pressure**: while more than ``HIGH_WATER`` bytes of body wait unread (a slow client),
  the connection stops reading from the engine, and resumes once they were taken.
* **Splicing**: :meth:`UpstreamResponse.splice` hands the body's pieces to a callback as they
  arrive, inside ``data_received``, instead of queueing them for a reader: a relay that sends
  each piece on at once needs no task wake-up per piece (one per streamed token before). The
  piece that ends the answer, an error and the end itself still go to the reader, whose
  :meth:`UpstreamResponse.read_some` then returns; so do the pieces that arrive after the
  callback returned ``False`` (it wants no more: its client is slow), and the reader takes
  over.

Request headers come from the caller; a name or value containing CR, LF or NUL is dropped
rather than written (no header injection, whatever the caller forwards).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import cast

from kvroute_router.http1.head import (
    MAX_HEAD_BYTES,
    HTTPFramingError,
    ResponseHead,
    parse_head,
    split_address,
)

HIGH_WATER = 256 * 1024
"""Unread body bytes at which the connection pauses reading from the engine."""
DEFAULT_IDLE_TIMEOUT_S = 60.0
_UNSAFE = ("\r", "\n", "\0")


class UpstreamConnectError(OSError):
    """No connection could be opened to the endpoint."""


class UpstreamBrokenError(OSError):
    """The connection was cut, or the answer could not be framed."""


class _StaleError(Exception):
    """A reused connection ended before any byte of the answer."""


class _Connection(asyncio.Protocol):
    """One connection's protocol: parses one answer at a time into head + body pieces."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._loop = asyncio.get_running_loop()
        self._buffer = b""
        self._head_waiter: asyncio.Future[ResponseHead] | None = None
        self._head: ResponseHead | None = None
        self._received_any = False
        # body state
        self._remaining = 0  # Content-Length bytes left, or the current chunk's bytes left
        self._chunk_state = 0  # 0: a size line next, 1: chunk data, 2: its CRLF, 3: trailers
        self.done = False
        self.error: BaseException | None = None
        self.pieces: list[bytes] = []
        self.unread = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.sink: Callable[[bytes], bool] | None = None
        """Takes body pieces as they arrive (see :meth:`UpstreamResponse.splice`)."""

    # ---- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._head is None:
            if self._head_waiter is not None and not self._head_waiter.done():
                self._head_waiter.set_exception(
                    UpstreamBrokenError(f"the connection closed mid-head ({exc})")
                    if self._received_any else _StaleError())
            return
        if not self.done and self.error is None:
            if self._head.length is None and not self._head.chunked:
                self.done = True  # a read-to-close body ends here
            else:
                self.error = UpstreamBrokenError(
                    f"the connection closed before the answer's end ({exc or 'EOF'})")
        self._wake()

    def data_received(self, data: bytes) -> None:
        self._received_any = True
        if self._head is None:
            self._buffer += data
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    self._fail_head(HTTPFramingError("the answer's head is too long"))
                return
            try:
                head = parse_head(self._buffer[:end])
            except HTTPFramingError as exc:
                self._fail_head(exc)
                return
            data, self._buffer = self._buffer[end + 4:], b""
            if 100 <= head.status < 200 and head.status != 101:
                if data:
                    self.data_received(data)  # an interim answer: the real head follows
                return
            self._head = head
            if head.chunked:
                self._chunk_state = 0
            elif head.length is not None:
                self._remaining = head.length
                if head.length == 0:
                    self.done = True
            if self._head_waiter is not None and not self._head_waiter.done():
                self._head_waiter.set_result(head)
            if not data:
                return
        if self.done or self.error is not None:
            self.lost = True  # bytes after the answer's end: ignored, never reused
            return
        head = self._head
        if head.chunked:
            self._chunked(data)
        elif head.length is not None:
            if len(data) >= self._remaining:
                if len(data) > self._remaining:
                    self.lost = True  # bytes after the answer's end: never reused
                data, self.done = data[:self._remaining], True
            self._remaining -= len(data)
            self._deliver(data)
        else:
            self._deliver(data)
        if self.sink is not None and self.pieces:
            self._splice(self.sink)
        if self.pieces or self.done or self.error is not None:  # else nothing to read yet
            self._wake()

    def _splice(self, sink: Callable[[bytes], bool]) -> None:
        """Hand the pieces received to ``sink``, unless they end the answer (the reader ends
        it). ``sink`` returning ``False``: the next pieces go to the reader."""
        if self.done or self.error is not None:
            self.sink = None
            return
        pieces, self.pieces = self.pieces, []
        self.unread = 0
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            self.transport.resume_reading()
        if not sink(pieces[0] if len(pieces) == 1 else b"".join(pieces)):
            self.sink = None

    def _fail_head(self, exc: Exception) -> None:
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(UpstreamBrokenError(str(exc)))
        self.abort()

    def _deliver(self, data: bytes) -> None:
        if data:
            self.pieces.append(data)
            self.unread += len(data)
            if self.unread > HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()

    def _chunked(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        position, size = 0, len(buffer)
        while position < size:
            state = self._chunk_state
            if state == 1:  # chunk data
                take = min(self._remaining, size - position)
                self._deliver(buffer[position:position + take])
                position += take
                self._remaining -= take
                if self._remaining == 0:
                    self._chunk_state = 2
                continue
            end = buffer.find(b"\r\n", position)
            if end < 0:
                self._buffer = buffer[position:]
                if len(self._buffer) > MAX_HEAD_BYTES:
                    self._break("a chunk header or trailer is too long")
                return
            line = buffer[position:end]
            position = end + 2
            if state == 2:  # the CRLF after a chunk's data
                if line:
                    self._break("bad chunk framing")
                    return
                self._chunk_state = 0
            elif state == 0:  # a chunk-size line
                try:
                    chunk = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self._break(f"bad chunk size {line[:20]!r}")
                    return
                if chunk < 0:
                    self._break("bad chunk size")
                    return
                if chunk == 0:
                    self._chunk_state = 3
                else:
                    self._remaining, self._chunk_state = chunk, 1
            elif not line:  # state 3: trailers end with an empty line
                self.done = True
                if position < size:
                    self.lost = True  # bytes after the answer's end: never reused
                return

    def _break(self, reason: str) -> None:
        self.error = UpstreamBrokenError(reason)
        self.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- used by the pool and the response ---------------------------------------------------
    def start(self, request: bytes) -> asyncio.Future[ResponseHead]:
        """Send ``request``; the future resolves with the answer's head."""
        assert self.transport is not None
        self._head, self._buffer, self._received_any = None, b"", False
        self.done, self.error, self.pieces, self.unread = False, None, [], 0
        self.sink = None
        self._head_waiter = self._loop.create_future()
        self.transport.write(request)
        return self._head_waiter

    async def read(self) -> bytes:
        """The body bytes received since the last call (waits for some); ``b""`` at its end."""
        while not self.pieces:
            if self.error is not None:
                raise self.error
            if self.done:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        pieces, self.pieces = self.pieces, []
        self.unread = 0
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            self.transport.resume_reading()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def reusable(self) -> bool:
        return (self.done and self.error is None and not self.lost and not self.pieces
                and self._head is not None and not self._head.close)

    def abort(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """An answer being received: its status and headers, and its body as it arrives."""

    def __init__(self, pool: ConnectionPool, connection: _Connection, head: ResponseHead
                 ) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self.status = head.status
        self.headers = head.headers
        """Lower-cased header names."""
        self.length = head.length
        """The body's ``Content-Length``; ``None`` when chunked or read to the close."""
        self.encoding = head.encoding
        """The body's content coding (lower case, ``""`` for none); the body is not decoded."""

    async def read_some(self) -> bytes:
        """Body bytes received so far and not yet read (waits for some); ``b""`` at the end."""
        if self._connection is None:
            return b""
        return await self._connection.read()

    @property
    def complete(self) -> bool:
        """The whole body arrived and was read: the next :meth:`read_some` returns ``b""``."""
        connection = self._connection
        return connection is None or (connection.done and connection.error is None
                                      and not connection.pieces)

    def splice(self, sink: Callable[[bytes], bool]) -> None:
        """From now on, body pieces go to ``sink`` as they arrive (in ``data_received``)
        rather than to :meth:`read_some`, until the answer ends, fails, or ``sink`` returns
        ``False`` (it took that piece; it wants no more). The piece that ends the answer is
        never spliced: :meth:`read_some` returns it, and returns the moment the answer ends or
        fails or ``sink`` declined, so a reader waiting there sees everything in order. Call
        it after :meth:`read_some` returned what had arrived; :meth:`release` ends it.
        """
        if self._connection is not None:
            self._connection.sink = sink

    async def read(self, limit: int) -> bytes:
        """The body up to ``limit`` bytes (less when it ends first)."""
        parts: list[bytes] = []
        total = 0
        while total < limit and (piece := await self.read_some()):
            parts.append(piece)
            total += len(piece)
        return b"".join(parts)[:limit]

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        piece = await self.read_some()
        if not piece:
            raise StopAsyncIteration
        return piece

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool if it can be reused,
        else it is aborted. Safe to call more than once."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.sink = None
            self._pool.put(connection)


def request_bytes(method: str, address: str, path: str, headers: Iterable[tuple[str, str]],
                  body: bytes = b"") -> bytes:
    """An HTTP/1.1 request to ``address`` (its ``Host``) with a ``Content-Length``; a header
    whose name or value holds CR, LF or NUL is left out (it could split the request)."""
    lines = [f"{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: {len(body)}\r\n"]
    for name, value in headers:
        if not any(c in name or c in value for c in _UNSAFE):
            lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape") + body


class ConnectionPool:
    """Kept-alive connections per ``host:port``, and requests over them."""

    def __init__(self, connect_timeout_s: float = 2.0,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._idle: dict[str, list[_Connection]] = {}
        self._closed = False

    async def request(self, address: str, method: str, path: str,
                      headers: Iterable[tuple[str, str]], body: bytes = b""
                      ) -> UpstreamResponse:
        """Send one request to ``address`` (``host:port``) and wait for the answer's head.

        Cancelling the wait aborts the connection."""
        return await self.send(address, request_bytes(method, address, path, headers, body))

    async def send(self, address: str, request: bytes) -> UpstreamResponse:
        """:meth:`request` with the request already in bytes (:func:`request_bytes`): a caller
        that sends the same request again and again (the metrics scraper) builds it once."""
        connection = self._take(address)
        if connection is not None:
            try:
                return await self._exchange(connection, request)
            except _StaleError:
                pass  # closed by the engine as it was reused: once more on a new one
        connection = await self._connect(address)
        try:
            return await self._exchange(connection, request)
        except _StaleError:
            raise UpstreamBrokenError("the connection closed before the answer") from None

    async def _exchange(self, connection: _Connection, request: bytes) -> UpstreamResponse:
        try:
            head = await connection.start(request)
        except BaseException:
            connection.abort()
            raise
        return UpstreamResponse(self, connection, head)

    def _take(self, address: str) -> _Connection | None:
        idle = self._idle.get(address)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.lost:
                continue
            if now - connection.idle_since > self.idle_timeout_s:
                connection.abort()
                continue
            return connection
        return None

    async def _connect(self, address: str) -> _Connection:
        if self._closed:
            raise UpstreamConnectError("the connection pool is closed")
        host, port = split_address(address)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, protocol = await loop.create_connection(lambda: _Connection(address),
                                                           host, port)
        except TimeoutError:
            raise  # an OSError too: the caller's timeout handling, not a connect error
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {address}: {exc}") from exc
        return protocol

    def put(self, connection: _Connection) -> None:
        """A connection whose answer ended (or was abandoned)."""
        if self._closed or not connection.reusable():
            connection.abort()
            return
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.address, []).append(connection)

    def close(self) -> None:
        """Abort every idle connection; later requests fail to connect."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                with contextlib.suppress(Exception):
                    connection.abort()


__all__ = ["ConnectionPool", "UpstreamBrokenError", "UpstreamConnectError", "UpstreamResponse",
           "request_bytes"]
