"""The floor of a Python proxy: what relaying a request costs on uvloop with nothing else.

A measuring baseline for ``bench/router_cpu.py cpu --contender python-floor``
(docs/benchmarks/router-cpu.md, *Round 22*), **not a router**: it takes HTTP/1.1 requests with a
``Content-Length`` body, sends each to the next engine in turn over a kept-alive connection
(the request line, ``Host``, ``Content-Type``, ``Content-Length`` and the body's bytes as
they came), and writes the engine's answer back byte for byte as it arrives, its framing
untouched, until the answer's end (its ``Content-Length``, or the chunked terminator). No
JSON, no routing decision, no metrics, no scraping, no error handling: what any Python proxy
on this event loop pays for the sockets and the loop, against which kvroute's own work is
measured.

    python bench/floor_proxy.py PORT HOST:PORT [HOST:PORT ...]
"""

from __future__ import annotations

import asyncio
import itertools
import sys

import uvloop

_END = b"\r\n\r\n"
_TERMINATOR = b"0\r\n\r\n"


def _length(head: bytes) -> int:
    """The ``Content-Length`` of a lower-cased head (0 without one)."""
    at = head.find(b"content-length:")
    if at < 0:
        return 0
    end = head.find(b"\r\n", at)
    return int(head[at + 15:end if end >= 0 else len(head)])


class _Upstream(asyncio.Protocol):
    """One kept-alive connection to an engine, relaying one answer at a time."""

    def __init__(self, proxy: _Proxy, engine: int) -> None:
        self.proxy, self.engine = proxy, engine
        self.transport: asyncio.Transport | None = None
        self.client: _Client | None = None
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.left = 0
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def begin(self, client: _Client, request: bytes) -> None:
        self.client, self.head, self.in_body, self.tail = client, b"", False, b""
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        if not self.in_body:
            self.head += data
            end = self.head.find(_END)
            if end < 0:
                return
            head = self.head[:end].lower()
            self.in_body = True
            self.chunked = b"transfer-encoding: chunked" in head
            self.left = end + 4 + _length(head)
            data = self.head
        client.write(data)
        if self.chunked:
            self.tail = (self.tail + data)[-len(_TERMINATOR):]
            finished = self.tail == _TERMINATOR
        else:
            self.left -= len(data)
            finished = self.left <= 0
        if finished:
            self.client = None
            self.proxy.idle[self.engine].append(self)
            client.answered()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.proxy.idle[self.engine]:
            self.proxy.idle[self.engine].remove(self)


class _Client(asyncio.Protocol):
    """A client connection: one request at a time, in order."""

    def __init__(self, proxy: _Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.busy:
            return
        end = self.buffer.find(_END)
        if end < 0:
            return
        head = self.buffer[:end]
        length = _length(head.lower())
        if len(self.buffer) < end + 4 + length:
            return
        body, self.buffer = self.buffer[end + 4:end + 4 + length], self.buffer[end + 4 + length:]
        self.busy = True
        asyncio.get_running_loop().create_task(
            self.proxy.forward(self, head.split(b"\r\n", 1)[0], body))

    def answered(self) -> None:
        self.busy = False
        if self.buffer:
            self.data_received(b"")


class _Proxy:
    def __init__(self, engines: list[str]) -> None:
        self.engines = engines
        self.turn = itertools.cycle(range(len(engines)))
        self.idle: dict[int, list[_Upstream]] = {i: [] for i in range(len(engines))}

    async def forward(self, client: _Client, line: bytes, body: bytes) -> None:
        engine = next(self.turn)
        address = self.engines[engine]
        if self.idle[engine]:
            upstream = self.idle[engine].pop()
        else:
            host, port = address.rsplit(":", 1)
            _, upstream = await asyncio.get_running_loop().create_connection(
                lambda: _Upstream(self, engine), host, int(port))
        upstream.begin(client, b"%b\r\nhost: %b\r\ncontent-type: application/json\r\n"
                               b"content-length: %d\r\n\r\n%b"
                       % (line, address.encode(), len(body), body))


async def serve(port: int, engines: list[str]) -> None:
    proxy = _Proxy(engines)
    await asyncio.get_running_loop().create_server(lambda: _Client(proxy), "127.0.0.1", port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2:]))
