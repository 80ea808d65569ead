"""Fault controls through the admin endpoint, and requests a client abandons."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio
from kvroute_emulator.fleet import EmulatedFleet

from tests.emulated import MODEL

BOUND_S = 30.0  # detects a hang; never a performance threshold


async def _admin(fleet: EmulatedFleet, path: str, body: Any = None,
                 status: int = 200) -> Any:
    url = f"http://127.0.0.1:{fleet.admin_port}{path}"
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        assert r.status == status, await r.text()
        return await r.json()


async def _engines(fleet: EmulatedFleet) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{fleet.admin_port}/engines") as r:
        result: list[dict[str, Any]] = await r.json()
        return result


async def _complete(url: str, prompt: str, max_tokens: int = 2) -> int:
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens}) as r:
        await r.read()
        return r.status


async def _until(predicate: Any) -> None:
    async with asyncio.timeout(BOUND_S):
        for _ in range(100_000):
            if await predicate():
                return
            await asyncio.sleep(0.01)


async def test_kill_cuts_streams_and_refuses_then_restart_starts_empty(fleet: EmulatedFleet
                                                                        ) -> None:
    e = fleet.endpoints()[0]
    assert await _complete(e["url"], "K" * 100) == 200
    async with aiohttp.ClientSession() as s, s.post(f"{e['url']}/v1/completions", json={
            "model": MODEL, "prompt": "L" * 64, "max_tokens": 3000, "stream": True}) as r:
        await r.content.readline()  # streaming has begun
        await _admin(fleet, "/engines/0/kill")
        with pytest.raises(aiohttp.ClientError):
            async with asyncio.timeout(BOUND_S):
                await r.read()
    with pytest.raises(aiohttp.ClientConnectionError):
        await _complete(e["url"], "K" * 100)
    state = await _admin(fleet, "/engines/0/restart")
    assert state["alive"] and state["kv_seq"] == 0 and state["url"] == e["url"]
    assert await _complete(e["url"], "K" * 100) == 200
    [engine0, _] = await _engines(fleet)
    assert engine0["prefix_cache_hits"] == 0  # the cache did not survive the restart
    assert engine0["kv_seq"] == 1  # the first batch after the restart was seq 0


async def test_stall_holds_requests_until_resume(fleet: EmulatedFleet) -> None:
    e = fleet.endpoints()[1]
    await _admin(fleet, "/engines/1/stall")
    task = asyncio.create_task(_complete(e["url"], "Q" * 50))

    async def waiting() -> bool:
        return bool((await _engines(fleet))[1]["waiting"] == 1)

    await _until(waiting)
    steps = (await _engines(fleet))[1]["steps"]
    assert not task.done()
    await asyncio.sleep(0.05)
    assert (await _engines(fleet))[1]["steps"] == steps  # no step ran while stalled
    await _admin(fleet, "/engines/1/resume")
    async with asyncio.timeout(BOUND_S):
        assert await task == 200


async def test_dropped_events_advance_the_sequence_and_stay_in_replay(fleet: EmulatedFleet
                                                                      ) -> None:
    e = fleet.endpoints()[1]
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(e["kv_events_endpoint"])
    try:
        async with asyncio.timeout(BOUND_S):  # until the subscription is live
            i = 0
            while not await sub.poll(50):
                await _complete(e["url"], f"w{i}" * 40)
                i += 1
            while await sub.poll(50):
                await sub.recv_multipart()
        await _admin(fleet, "/engines/1/events", {"drop": 1.0})
        before = (await _engines(fleet))[1]["kv_seq"]
        await _complete(e["url"], "dropped" * 20)
        assert (await _engines(fleet))[1]["kv_seq"] == before + 1
        assert not await sub.poll(100)
        await _admin(fleet, "/engines/1/events", {"drop": 0.0, "garble": 1.0})
        await _complete(e["url"], "garbled" * 20)
        async with asyncio.timeout(BOUND_S):
            _, seq, payload = await sub.recv_multipart()
        assert int.from_bytes(seq, "big") == before + 1
        with pytest.raises(msgspec.DecodeError):
            msgspec.msgpack.decode(payload)
    finally:
        ctx.destroy(linger=0)


async def test_admin_rejects_bad_input(fleet: EmulatedFleet) -> None:
    assert (await _admin(fleet, "/engines/7/kill", status=404))["error"]["param"] == "index"
    assert (await _admin(fleet, "/engines/0/slow", {"factor": 0}, 400))["error"]["param"] \
        == "factor"
    assert (await _admin(fleet, "/engines/0/events", {"drop": 2}, 400))["error"]["param"] \
        == "drop"
    assert (await _admin(fleet, "/engines/0/explode", status=404))["error"]["param"] \
        == "action"
    state = await _admin(fleet, "/engines/0/slow", {"factor": 3})
    assert state["slowdown"] == 3
    for bad in ({}, {"delay_s": -1}, {"delay_s": 601}, {"delay_s": "1"}):
        assert (await _admin(fleet, "/engines/0/metrics", bad, 400))["error"]["param"] \
            == "delay_s", bad


async def test_metrics_delay_holds_the_page_while_requests_are_served(
        fleet: EmulatedFleet) -> None:
    """The ``metrics`` fault: ``/metrics`` (both paths) answers late, completions do not."""
    state = await _admin(fleet, "/engines/0/metrics", {"delay_s": 5})
    assert state["metrics_delay_s"] == 5
    url = fleet.endpoints()[0]["url"]
    async with aiohttp.ClientSession() as s:
        for path in ("/metrics", "/metrics/?name[]=vllm:num_requests_running"):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3), s.get(f"{url}{path}") as r:
                    await r.read()
    assert await _complete(url, "served while the metrics page is held") == 200
    await _admin(fleet, "/engines/0/metrics", {"delay_s": 0})
    async with aiohttp.ClientSession() as s, asyncio.timeout(5), s.get(f"{url}/metrics") as r:
        assert r.status == 200


async def test_abandoned_stream_is_aborted_and_frees_the_engine(fleet: EmulatedFleet) -> None:
    e = fleet.endpoints()[0]
    async with aiohttp.ClientSession() as s:
        r = await s.post(f"{e['url']}/v1/completions", json={
            "model": MODEL, "prompt": "Z" * 64, "max_tokens": 3000, "stream": True})
        await r.content.readline()
        r.close()  # the client goes away mid-stream

    async def idle() -> bool:
        engine = (await _engines(fleet))[0]
        return bool(engine["running"] == 0 and engine["waiting"] == 0)

    await _until(idle)
    async with aiohttp.ClientSession() as s, s.get(f"{e['url']}/metrics") as r:
        text = await r.text()
    assert 'finished_reason="abort"} 1.0' in text.replace(',model_name="kvroute-test-model"', "")


async def test_timings_of_streamed_requests_by_request_id(fleet: EmulatedFleet) -> None:
    """``GET /timings``: arrival and first-token times of streamed requests that carried an
    ``x-request-id`` (what bench/router_cpu.py subtracts to find a router's added time), then
    empty."""
    url = fleet.endpoints()[0]["url"]
    # The emulator's clock (time.monotonic), not the loop's: uvloop's loop.time() is libuv's
    # cached time in whole milliseconds, so a first token written in the same millisecond as
    # the last loop iteration began read as later than "now".
    async with aiohttp.ClientSession() as s:
        before = time.monotonic()
        for rid in ("probe-1", None):
            headers = {"x-request-id": rid} if rid else {}
            async with s.post(f"{url}/v1/completions", headers=headers, json={
                    "model": MODEL, "prompt": "T" * 64, "max_tokens": 2, "stream": True}) as r:
                assert r.status == 200
                await r.read()
        admin = f"http://127.0.0.1:{fleet.admin_port}/timings"
        async with s.get(admin) as r:
            timings = await r.json()
        assert list(timings) == ["probe-1"]
        arrived, first = timings["probe-1"]
        assert before <= arrived <= first <= time.monotonic()
        async with s.get(admin) as r:
            assert await r.json() == {}
