"""The proxy's upstream HTTP/1.1 client against real loopback servers (and its parser fed
byte by byte): framing, keep-alive reuse, stale connections, cut answers, back-pressure,
splicing."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvroute_router.http1.client import (
    HIGH_WATER,
    ConnectionPool,
    UpstreamBrokenError,
    UpstreamConnectError,
    _Connection,
)
from kvroute_router.http1.head import HTTPFramingError, parse_head

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A raw TCP server on loopback whose handler writes whatever bytes a test wants."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_client = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head + Content-Length body); ``None`` when the client closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.closed_by_client.set()
            return None
        length = int(parse_head(b"HTTP/1.1 200 x\r\n" + head.split(b"\r\n", 1)[1])
                     .headers.get("content-length", "0"))
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def serving(handler_of: Callable[[Server], Handler]) -> AsyncIterator[Server]:
    server = Server(lambda r, w: asyncio.sleep(0))
    server.handler = handler_of(server)
    server.server = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.server.close()


def keep_alive_answers(*answers: bytes) -> Callable[[Server], Handler]:
    """Answer each request on a connection with the next of ``answers`` (kept alive)."""
    def handler_of(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for answer in answers:
                if await server.read_request(reader) is None:
                    return
                writer.write(answer)
                await writer.drain()
            await server.read_request(reader)
        return handle
    return handler_of


async def body_of(pool: ConnectionPool, address: str, body: bytes = b"{}") -> tuple[int, bytes]:
    response = await pool.request(address, "POST", "/v1/completions",
                                  [("content-type", "application/json")], body)
    try:
        return response.status, b"".join([piece async for piece in response])
    finally:
        response.release()


async def test_content_length_answers_reuse_one_connection() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Request-Id: r1\r\n\r\nhello"
    async with serving(keep_alive_answers(answer, answer, answer)) as server:
        pool = ConnectionPool()
        for _ in range(3):
            assert await body_of(pool, server.address, b'{"a": 1}') == (200, b"hello")
        assert server.connections == 1
        sent = server.requests[0]
        assert sent.startswith(b"POST /v1/completions HTTP/1.1\r\n")
        assert f"Host: {server.address}\r\n".encode() in sent
        assert b"Content-Length: 8\r\n" in sent and sent.endswith(b'\r\n\r\n{"a": 1}')
        pool.close()


async def test_chunked_answer_with_trailers_and_headers() -> None:
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream"
              b"\r\nSet-Cookie: a\r\nSet-Cookie: b\r\n\r\n5;ext=1\r\ndata:\r\n"
              b"4\r\n one\r\n0\r\nX-Trailer: t\r\n\r\n")
    async with serving(keep_alive_answers(answer, answer)) as server:
        pool = ConnectionPool()
        response = await pool.request(server.address, "POST", "/", [], b"")
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["set-cookie"] == "a, b"
        assert b"".join([piece async for piece in response]) == b"data: one"
        response.release()
        assert await body_of(pool, server.address) == (200, b"data: one")
        assert server.connections == 1


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nHTTP/1.1 2",
])
async def test_bytes_after_an_answer_keep_its_connection_from_reuse(answer: bytes) -> None:
    async with serving(keep_alive_answers(answer, answer)) as server:
        pool = ConnectionPool()
        assert await body_of(pool, server.address) == (200, b"ok")
        assert await body_of(pool, server.address) == (200, b"ok")
        assert server.connections == 2  # the stray bytes never become the next answer


async def test_a_read_to_close_answer_ends_with_the_connection() -> None:
    def handler_of(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")
            await writer.drain()
        return handle
    async with serving(handler_of) as server:
        pool = ConnectionPool()
        assert await body_of(pool, server.address) == (200, b"all of it")
        assert await body_of(pool, server.address) == (200, b"all of it")
        assert server.connections == 2  # never reused


async def test_an_idle_connection_the_engine_closed_is_not_reused() -> None:
    def handler_of(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()  # then close: an engine's keep-alive timeout
        return handle
    async with serving(handler_of) as server:
        pool = ConnectionPool()
        assert await body_of(pool, server.address) == (200, b"ok")
        await asyncio.sleep(0.05)  # the FIN arrives
        assert await body_of(pool, server.address) == (200, b"ok")
        assert server.connections == 2


async def test_a_reused_connection_closed_without_an_answer_is_retried_once() -> None:
    def handler_of(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            if server.connections == 1:
                await server.read_request(reader)  # the second request: dropped unanswered
        return handle
    async with serving(handler_of) as server:
        pool = ConnectionPool()
        assert await body_of(pool, server.address) == (200, b"ok")
        assert await body_of(pool, server.address) == (200, b"ok")
        assert server.connections == 2 and len(server.requests) == 3


async def test_a_fresh_connection_closed_without_an_answer_fails() -> None:
    def handler_of(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
        return handle
    async with serving(handler_of) as server:
        with pytest.raises(UpstreamBrokenError):
            await body_of(ConnectionPool(), server.address)
        assert server.connections == 1  # a new connection is not retried


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhalf\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhalfXX",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhalf\r\n",
])
async def test_an_answer_cut_short_or_misframed_raises_after_what_arrived(answer: bytes
                                                                         ) -> None:
    def handler_of(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(answer)
            await writer.drain()
        return handle
    async with serving(handler_of) as server:
        response = await ConnectionPool().request(server.address, "POST", "/", [], b"")
        received = b""
        with pytest.raises(UpstreamBrokenError):
            async for piece in response:
                received += piece
        response.release()
        assert b"half".startswith(received)


@pytest.mark.parametrize("answer", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"])
async def test_an_answer_that_is_not_http_fails(answer: bytes) -> None:
    async with serving(keep_alive_answers(answer)) as server:
        with pytest.raises(UpstreamBrokenError):
            await body_of(ConnectionPool(), server.address)


async def test_nothing_listening_is_a_connect_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamConnectError):
        await ConnectionPool().request(f"127.0.0.1:{port}", "POST", "/", [], b"")


async def test_headers_with_line_breaks_are_not_written() -> None:
    answer = b"HTTP/1.1 204 No Content\r\n\r\n"
    async with serving(keep_alive_answers(answer)) as server:
        pool = ConnectionPool()
        response = await pool.request(server.address, "POST", "/", [
            ("x-ok", "1"), ("x-evil", "a\r\nx-injected: 1"), ("x-bad\r\nname", "v"),
            ("x-nul", "a\0b")], b"")
        assert response.status == 204 and await response.read_some() == b""
        response.release()
        sent = server.requests[0]
        assert b"x-ok: 1\r\n" in sent
        assert b"injected" not in sent and b"x-bad" not in sent and b"x-nul" not in sent


async def test_releasing_an_unread_answer_closes_the_connection() -> None:
    def handler_of(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ndata\r\n")
            await writer.drain()
            await server.read_request(reader)  # returns None when the router closes
        return handle
    async with serving(handler_of) as server:
        pool = ConnectionPool()
        response = await pool.request(server.address, "POST", "/", [], b"")
        assert await response.read_some() == b"data"
        response.release()  # a client went away mid-stream: the engine must see the close
        await asyncio.wait_for(server.closed_by_client.wait(), 5)


async def test_a_slow_reader_pauses_the_engine_and_gets_every_byte() -> None:
    body = bytes(range(256)) * (HIGH_WATER // 64)  # 4 x HIGH_WATER

    def handler_of(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            for start in range(0, len(body), 4096):
                writer.write(body[start:start + 4096])
                await writer.drain()
        return handle
    async with serving(handler_of) as server:
        response = await ConnectionPool().request(server.address, "POST", "/", [], b"")
        received = bytearray()
        paused = False
        for _ in range(10_000):
            await asyncio.sleep(0.002)
            connection = response._connection
            assert connection is not None
            paused = paused or connection._paused
            # at most one socket read (256 KiB with uvloop and asyncio) past the mark
            assert connection.unread <= HIGH_WATER + 256 * 1024
            piece = await response.read_some()
            if not piece:
                break
            received += piece
        response.release()
        assert paused and bytes(received) == body


def collect(into: list[bytes]) -> Callable[[bytes], bool]:
    """A splice sink that keeps every piece (and always wants more)."""
    def sink(piece: bytes) -> bool:
        into.append(piece)
        return True
    return sink


def _paced_chunks(pieces: list[bytes], last_with_end: bool = True,
                  cut_after: int | None = None) -> Callable[[Server], Handler]:
    """Answer with ``pieces`` as chunks written one at a time, 20 ms apart (each its own
    ``data_received``); the last together with the terminator, or cut off after
    ``cut_after`` pieces."""
    def handler_of(server: Server) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for number, piece in enumerate(pieces):
                if number == cut_after:
                    writer.transport.abort()
                    return
                end = b"0\r\n\r\n" if last_with_end and number == len(pieces) - 1 else b""
                writer.write(b"%x\r\n%s\r\n%s" % (len(piece), piece, end))
                await writer.drain()
                await asyncio.sleep(0.02)
            if not last_with_end:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            await server.read_request(reader)
        return handle
    return handler_of


@pytest.mark.parametrize("last_with_end", [True, False])
async def test_a_spliced_answer_reaches_the_sink_in_order_and_its_end_the_reader(
        last_with_end: bool) -> None:
    pieces = [b"piece-%d" % i for i in range(6)]
    async with serving(_paced_chunks(pieces, last_with_end)) as server:
        pool = ConnectionPool()
        response = await pool.request(server.address, "POST", "/", [], b"")
        first = await response.read_some()
        sunk: list[bytes] = []
        response.splice(collect(sunk))
        read: list[bytes] = []
        while piece := await response.read_some():
            read.append(piece)
        assert first + b"".join(sunk) + b"".join(read) == b"".join(pieces)
        assert len(sunk) >= 4  # the pieces between the first and the last, as they came
        # the piece sent with the terminator ends the answer: the reader gets it, and the
        # reader woke once for it (or once, for the end, when the terminator came alone)
        assert read == ([pieces[-1]] if last_with_end else [])
        response.release()
        assert server.connections == 1 and pool._idle[server.address]  # kept alive


async def test_a_sink_that_declines_hands_the_next_pieces_to_the_reader() -> None:
    pieces = [b"piece-%d" % i for i in range(6)]
    async with serving(_paced_chunks(pieces)) as server:
        response = await ConnectionPool().request(server.address, "POST", "/", [], b"")
        received = [await response.read_some()]
        taken: list[bytes] = []

        def sink(piece: bytes) -> bool:
            taken.append(piece)
            return False  # this one, then no more

        response.splice(sink)
        piece = await response.read_some()  # returns once the sink declined
        assert len(taken) == 1 and piece
        received += [*taken, piece]
        while piece := await response.read_some():
            received.append(piece)
        assert b"".join(received) == b"".join(pieces) and len(taken) == 1
        response.release()


async def test_a_spliced_answer_cut_short_raises_to_the_reader() -> None:
    pieces = [b"piece-%d" % i for i in range(6)]
    async with serving(_paced_chunks(pieces, cut_after=3)) as server:
        response = await ConnectionPool().request(server.address, "POST", "/", [], b"")
        first = await response.read_some()
        sunk: list[bytes] = []
        response.splice(collect(sunk))
        with pytest.raises(UpstreamBrokenError):
            await asyncio.wait_for(response.read_some(), 10)
        assert first + b"".join(sunk) == b"".join(pieces[:3])
        response.release()


async def test_an_interim_100_answer_is_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with serving(keep_alive_answers(answer)) as server:
        assert await body_of(ConnectionPool(), server.address) == (200, b"ok")


class _Transport(asyncio.Transport):
    """Records what the protocol asks of its transport (the parser test below only)."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _chunked_answer(pieces: list[bytes]) -> bytes:
    framed = b"".join(b"%x;n=v\r\n%s\r\n" % (len(piece), piece) for piece in pieces if piece)
    return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
            + b"0\r\nX-T: 1\r\n\r\n")


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.binary(min_size=0, max_size=40), max_size=8),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30))
def test_a_chunked_answer_split_anywhere_decodes_to_its_body(pieces: list[bytes],
                                                             cuts: list[int]) -> None:
    answer = _chunked_answer(pieces)
    bounds = sorted({0, len(answer), *(cut for cut in cuts if cut < len(answer))})

    async def run() -> bytes:
        connection = _Connection("test:1")
        transport = _Transport()
        connection.connection_made(transport)
        head = connection.start(b"")
        for start, end in itertools.pairwise(bounds):
            connection.data_received(answer[start:end])
        assert (await head).status == 200
        assert connection.done and connection.error is None and not transport.aborted
        received = await connection.read()  # everything arrived: one read takes it
        assert await connection.read() == b"" and connection.reusable()
        return received

    async def spliced() -> bytes:  # every piece but the one the answer ends with: the sink's
        connection = _Connection("test:1")
        connection.connection_made(_Transport())
        head = connection.start(b"")
        sunk: list[bytes] = []
        connection.sink = collect(sunk)
        for start, end in itertools.pairwise(bounds):
            connection.data_received(answer[start:end])
        assert (await head).status == 200 and connection.done
        return b"".join(sunk) + await connection.read()

    assert asyncio.run(run()) == b"".join(pieces)
    assert asyncio.run(spliced()) == b"".join(pieces)


def test_parse_head_rejects_what_it_cannot_frame() -> None:
    with pytest.raises(HTTPFramingError):
        parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2")
    head = parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0")
    assert (head.close, head.length) == (False, 0)
    head = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9")
    assert (head.chunked, head.length, head.close) == (True, None, False)
    assert parse_head(b"HTTP/1.1 200 OK").close  # no length, not chunked: read to close
