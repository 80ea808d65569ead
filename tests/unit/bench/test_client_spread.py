"""The load generator spreads requests over several base URLs round-robin per request: the
direct-rr contender and ``--replicas N`` (L7 balancing in front of a router Deployment)."""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import web
from kvroute_bench.client import run_trace
from kvroute_bench.workloads import TraceRequest

from tests.aiohttp_server import serving


def _app(seen: list[int], tag: int) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(int(body["prompt"].split()[1]))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"choices": [{"text": f"r{tag}", "index": 0}]}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"choices": [], "usage": {"completion_tokens": 1}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


def test_requests_rotate_over_base_urls_one_by_one() -> None:
    async def scenario() -> list[list[int]]:
        seen: list[list[int]] = [[], [], []]
        async with contextlib.AsyncExitStack() as stack:
            urls = [await stack.enter_async_context(serving(_app(seen[i], i)))
                    for i in range(3)]
            requests = [TraceRequest(index=i, arrival_s=0.01 * i, prompt=f"req {i} x",
                                     max_tokens=1, group="g", shared_tokens=0)
                        for i in range(9)]
            results = await run_trace(urls, "m", requests, timeout_s=10)
            assert all(r.ok for r in results)
        return seen

    seen = asyncio.run(scenario())
    # Request i went to URL i mod 3, whatever its group or prompt: per request, not sticky.
    assert [sorted(s) for s in seen] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
