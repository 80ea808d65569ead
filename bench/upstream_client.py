"""CPU per upstream request: the proxy's own HTTP/1.1 client against aiohttp's ClientSession.

The proxy's hop to an engine is a ``POST`` of a ~7 KB JSON body answered by a short SSE stream.
This bench measures what the *client* side of that hop costs in the router's process, apart
from everything else the router does: a separate server process (plain asyncio, on loopback)
answers every request with the same chunked stream of ``--events`` SSE events, and the bench
process sends ``--requests`` requests with ``--concurrency`` in flight through each client,
alternating clients over ``--rounds`` rounds, and reports the process's CPU time per request
(``time.process_time``; the server's CPU is not counted). Both clients read every body chunk
as it arrives, as the proxy's relay does.

    python bench/upstream_client.py --requests 2000 --rounds 5 [--events 3] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from kvroute_router.http1.client import ConnectionPool

BODY = json.dumps({"model": "m", "prompt": "word " * 1400, "max_tokens": 2,
                   "stream": True}).encode()
HEADERS = [("content-type", "application/json"), ("user-agent", "bench"),
           ("x-request-id", "0123456789abcdef0123456789abcdef")]


def _answer(events: int) -> bytes:
    chunks = [b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,'
              b'"text":" token","finish_reason":null}]}\n\n'] * events + [b"data: [DONE]\n\n"]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n")


def _serve(port_out: Any, events: int) -> None:
    answer = _answer(events)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                writer.write(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_out.send(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    uvloop.run(main())


async def _through_aiohttp(session: aiohttp.ClientSession, url: str) -> int:
    async with session.post(url, data=BODY, headers=dict(HEADERS),
                            timeout=aiohttp.ClientTimeout(total=None, connect=2.0)) as resp:
        received = 0
        async for chunk in resp.content.iter_any():
            received += len(chunk)
        return received


async def _through_http1(pool: ConnectionPool, address: str) -> int:
    response = await pool.request(address, "POST", "/v1/completions", HEADERS, BODY)
    try:
        received = 0
        async for chunk in response:
            received += len(chunk)
        return received
    finally:
        response.release()


async def _measure(client: str, port: int, requests: int, concurrency: int) -> float:
    """CPU ms per request of this process for ``requests`` requests through ``client``."""
    address = f"127.0.0.1:{port}"
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
    pool = ConnectionPool()
    queue = list(range(requests))

    async def worker() -> None:
        while queue:
            queue.pop()
            if client == "aiohttp":
                await _through_aiohttp(session, f"http://{address}/v1/completions")
            else:
                await _through_http1(pool, address)

    try:
        for _ in range(concurrency * 4):  # connections open, caches warm
            if client == "aiohttp":
                await _through_aiohttp(session, f"http://{address}/v1/completions")
            else:
                await _through_http1(pool, address)
        started = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return (time.process_time() - started) * 1000 / requests
    finally:
        await session.close()
        pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    receive, send = multiprocessing.Pipe(duplex=False)
    server = multiprocessing.Process(target=_serve, args=(send, args.events), daemon=True)
    server.start()
    port = receive.recv()
    results: dict[str, list[float]] = {"aiohttp": [], "http1": []}
    try:
        for round_ in range(args.rounds):
            for client in ("aiohttp", "http1"):
                ms = uvloop.run(_measure(client, port, args.requests, args.concurrency))
                results[client].append(ms)
                print(f"round {round_ + 1}: {client:8s} {ms * 1000:7.1f} µs CPU per request",
                      file=sys.stderr)
    finally:
        server.terminate()
    summary = {client: statistics.median(values) * 1000 for client, values in results.items()}
    print(f"median µs per request: aiohttp {summary['aiohttp']:.1f}, "
          f"http1 {summary['http1']:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "us_per_request": results,
                                         "median_us": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
