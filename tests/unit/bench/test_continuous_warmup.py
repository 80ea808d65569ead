"""``--warmup-mode continuous``: the warm-up flows into the measured window without draining,
the engines' counters are read as the first measured request leaves, and only the measured
requests are reported."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web
from kvroute_bench.harness import send_continuous
from kvroute_bench.workloads import TraceRequest

from tests.aiohttp_server import serving


def _app(log: dict[str, list[str]]) -> web.Application:
    """A streaming completions endpoint; warm-up prompts take 0.5 s to answer."""

    async def completions(request: web.Request) -> web.StreamResponse:
        prompt = str((await request.json())["prompt"])
        log["open_at_arrival"].append(f"{prompt}:{len(log['open'])}")
        log["open"].append(prompt)
        if prompt.startswith("warm"):
            await asyncio.sleep(0.5)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"choices": [{"text": "x", "index": 0}]}
        usage = {"choices": [], "usage": {"completion_tokens": 1}}
        await resp.write(f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(usage)}\n\n"
                         "data: [DONE]\n\n".encode())
        log["open"].remove(prompt)
        log["finished"].append(prompt)
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


def _requests(kind: str, start: int, count: int, t0: float) -> list[TraceRequest]:
    return [TraceRequest(index=start + i, arrival_s=t0 + 0.02 * i, prompt=f"{kind} {start + i}",
                         max_tokens=1, group="g", shared_tokens=0) for i in range(count)]


def test_measured_requests_start_on_the_queue_the_warm_up_left() -> None:
    log: dict[str, list[str]] = {"open": [], "open_at_arrival": [], "finished": []}
    switch: list[list[str]] = []

    def at_switch() -> int:
        switch.append(list(log["finished"]))  # the warm-up requests done by the switch
        return 7

    async def scenario() -> tuple[list[int], int]:
        async with serving(_app(log)) as url:
            warm = _requests("warm", 0, 3, 0.0)
            measured = _requests("measured", 3, 2, 0.1)
            results, value = await send_continuous([url], "m", warm, measured, at_switch,
                                                   timeout_s=10)
            assert all(r.ok for r in results)
            return [r.index for r in results], value

    indices, value = asyncio.run(scenario())
    assert indices == [3, 4] and value == 7  # only the measured requests are reported
    # The first measured request reached the engine while the three warm-up requests were
    # still open (a drained warm-up would have had none open), and the counters were read
    # before any warm-up request had finished.
    assert "measured 3:3" in log["open_at_arrival"]
    assert switch == [[]]


def test_nothing_measured_reads_the_counters_after_the_warm_up() -> None:
    log: dict[str, list[str]] = {"open": [], "open_at_arrival": [], "finished": []}

    async def scenario() -> tuple[int, list[str]]:
        async with serving(_app(log)) as url:
            results, done = await send_continuous(
                [url], "m", _requests("warm", 0, 2, 0.0), [],
                lambda: list(log["finished"]), timeout_s=10)
            return len(results), done

    count, done = asyncio.run(scenario())
    assert count == 0 and sorted(done) == ["warm 0", "warm 1"]
