"""The scraper's kept-alive ``GET /metrics`` client against raw loopback servers that answer
in each HTTP/1.1 framing (length, chunked, to-close, gzip), drop idle connections, or answer
garbage."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from kvroute_router.scrape.connection import MetricsConnection, ScrapeHTTPError, split_address

PAGE = b'vllm:num_requests_running{engine="0"} 3.0\n' * 50

Answer = Callable[[int], bytes]  # request number on this connection -> raw answer


@asynccontextmanager
async def serve(answer: Answer, close_after: int = 0) -> AsyncIterator[tuple[str, list[int]]]:
    """A server answering each GET with ``answer(n)``; ``close_after``: close a connection
    after that many answers (0: never). Yields its address and the request count of each
    connection it accepted."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(connections)
        connections.append(0)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"GET /metrics HTTP/1.1\r\n")
                connections[index] += 1
                writer.write(answer(connections[index]))
                await writer.drain()
                if close_after and connections[index] >= close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}", connections
    finally:
        server.close()


def with_length(body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)


async def test_answers_with_a_length_reuse_one_connection() -> None:
    async with serve(lambda n: with_length(PAGE)) as (address, connections):
        client = MetricsConnection(address)
        for _ in range(5):
            assert await client.get() == (200, PAGE)
        client.close()
    assert connections == [5]


async def test_chunked_gzip_and_read_to_close_bodies() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n" % len(part) + part + b"\r\n"
                          for part in (PAGE[:100], PAGE[100:]))
               + b"0\r\n\r\n")
    async with serve(lambda n: chunked) as (address, connections):
        client = MetricsConnection(address)
        assert await client.get() == (200, PAGE)
        assert await client.get() == (200, PAGE)  # the trailer was consumed: still in step
        client.close()
    assert connections == [2]
    zipped = with_length(gzip.compress(PAGE), b"Content-Encoding: gzip\r\n")
    async with serve(lambda n: zipped) as (address, _):
        client = MetricsConnection(address)
        assert await client.get() == (200, PAGE)
        client.close()
    to_close = b"HTTP/1.0 200 OK\r\n\r\n" + PAGE
    async with serve(lambda n: to_close, close_after=1) as (address, connections):
        client = MetricsConnection(address)
        assert await client.get() == (200, PAGE)
        assert await client.get() == (200, PAGE)
    assert connections == [1, 1]  # no length: the connection ended the body, a new one


async def test_a_dropped_idle_connection_is_retried_once_on_a_new_one() -> None:
    async with serve(lambda n: with_length(PAGE), close_after=1) as (address, connections):
        client = MetricsConnection(address)
        assert await client.get() == (200, PAGE)
        await asyncio.sleep(0.05)  # the server has closed it by now
        assert await client.get() == (200, PAGE)
        client.close()
    assert connections == [1, 1]


async def test_status_errors_and_garbage() -> None:
    async with serve(lambda n: b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n"
                               b"\r\nbusy") as (address, _):
        client = MetricsConnection(address)
        assert await client.get() == (503, b"busy")
        client.close()
    for garbage in (b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                    with_length(b"not gzip", b"Content-Encoding: gzip\r\n")):
        async with serve(lambda n, g=garbage: g) as (address, _):  # type: ignore[misc]
            client = MetricsConnection(address)
            with pytest.raises(ScrapeHTTPError):
                await client.get()
    async with serve(lambda n: b"", close_after=1) as (address, _):
        with pytest.raises(ScrapeHTTPError):  # a fresh connection that ends at once
            await MetricsConnection(address).get()


async def test_refused_and_timed_out() -> None:
    async with serve(lambda n: with_length(PAGE)) as (address, _):
        pass  # closed: nothing listens there now
    with pytest.raises(OSError):
        await MetricsConnection(address).get()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = MetricsConnection(f"127.0.0.1:{port}")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await client.get()
    # a timed-out request never leaves a half-read connection
    assert not any(client._pool._idle.values())
    server.close()


async def test_a_page_over_the_limit_is_refused_in_every_framing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kvroute_router.scrape import connection

    monkeypatch.setattr(connection, "MAX_BODY_BYTES", len(PAGE) - 1)
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                          for part in (PAGE[:100], PAGE[100:])) + b"0\r\n\r\n")
    to_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + PAGE
    for answer in (with_length(PAGE), chunked, to_close):
        async with serve(lambda n, a=answer: a, close_after=1) as (address, _):  # type: ignore[misc]
            client = MetricsConnection(address)
            with pytest.raises(ScrapeHTTPError, match="too large"):
                await client.get()
    monkeypatch.setattr(connection, "MAX_BODY_BYTES", len(PAGE))
    for answer in (with_length(PAGE), chunked, to_close):  # at the limit: read whole
        async with serve(lambda n, a=answer: a, close_after=1) as (address, _):  # type: ignore[misc]
            assert await MetricsConnection(address).get() == (200, PAGE)


def test_split_address() -> None:
    assert split_address("10.0.0.1:8000") == ("10.0.0.1", 8000)
    assert split_address("[::1]:8000") == ("::1", 8000)
    assert split_address("engine.local") == ("engine.local", 80)
