"""KV events (PUB framing, replay, chains) and the /metrics page of an emulated engine."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import zmq
import zmq.asyncio
from kvroute_emulator.fleet import EmulatedFleet, FleetConfig
from kvroute_emulator.hashing import block_hashes
from kvroute_emulator.model.profile import cpu_test_engine
from prometheus_client.parser import text_string_to_metric_families

from tests.emulated import MODEL

FIXTURES = Path(__file__).parent / "fixtures"
BOUND_S = 30.0  # detects a hang; never a performance threshold


class Subscriber:
    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)

    async def batches(self, count: int) -> list[tuple[bytes, int, list[Any]]]:
        out: list[tuple[bytes, int, list[Any]]] = []
        async with asyncio.timeout(BOUND_S):
            while len(out) < count:
                topic, seq, payload = await self.sock.recv_multipart()
                out.append((topic, int.from_bytes(seq, "big"),
                            msgspec.msgpack.decode(payload)))
        return out

    def close(self) -> None:
        self.ctx.destroy(linger=0)


async def _complete(url: str, prompt: str | list[int], max_tokens: int = 2) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens}) as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


async def _subscribed(endpoint: str, url: str) -> Subscriber:
    """A subscriber that is known to receive (PUB drops what is sent before a SUB joins):
    send probe requests until one's event arrives."""
    sub = Subscriber(endpoint)
    async with asyncio.timeout(BOUND_S):
        for i in range(1000):
            await _complete(url, f"probe {i} " + "p" * 64)
            if await sub.sock.poll(100):
                while await sub.sock.poll(50):
                    await sub.sock.recv_multipart()
                return sub
    raise AssertionError("no KV events")


async def test_block_stored_chains_are_vllm_hashes_of_the_prompt(fleet: EmulatedFleet) -> None:
    e = fleet.endpoints()[0]
    sub = await _subscribed(e["kv_events_endpoint"], e["url"])
    try:
        shared = "S" * 64
        await _complete(e["url"], shared + "A" * 40)
        [(topic, _, first)] = await sub.batches(1)
        assert topic == b""  # vLLM's default topic (KVEventsConfig.topic)
        ts, events, rank = first
        assert isinstance(ts, float) and rank == 0
        [stored] = events
        ids = list((shared + "A" * 40).encode())
        assert stored["type"] == "BlockStored" and stored["block_size"] == 32
        assert stored["block_hashes"] == block_hashes(ids, 32)
        assert stored["parent_block_hash"] is None and stored["token_ids"] == ids[:96]
        # A second prompt sharing two blocks: only its new block is stored, chained to them.
        await _complete(e["url"], shared + "B" * 40)
        [(_, _, second)] = await sub.batches(1)
        [stored2] = second[1]
        expected = block_hashes(list((shared + "B" * 40).encode()), 32)
        assert stored2["block_hashes"] == expected[2:]
        assert stored2["parent_block_hash"] == expected[1]
    finally:
        sub.close()


async def test_a_request_ending_with_its_prefill_still_publishes_its_chain(
        fleet: EmulatedFleet) -> None:
    """max_tokens=1: the request finishes in the step that stores its blocks; the event must
    still carry their token ids and parent (it was published empty once)."""
    e = fleet.endpoints()[0]
    sub = await _subscribed(e["kv_events_endpoint"], e["url"])
    try:
        ids = list(("R" * 64 + "S" * 70).encode())
        await _complete(e["url"], "R" * 64, max_tokens=1)
        [(_, _, (_, [first], _))] = await sub.batches(1)
        await _complete(e["url"], "R" * 64 + "S" * 70, max_tokens=1)
        [(_, _, (_, [second], _))] = await sub.batches(1)
        hashes = block_hashes(ids, 32)
        assert first["block_hashes"] == hashes[:2] and first["token_ids"] == ids[:64]
        assert first["parent_block_hash"] is None
        assert second["block_hashes"] == hashes[2:4]
        assert second["parent_block_hash"] == hashes[1]
        assert second["token_ids"] == ids[64:128]
    finally:
        sub.close()


async def test_output_blocks_are_stored_with_vllms_hashes_of_the_streamed_tokens(
        fleet: EmulatedFleet) -> None:
    """vLLM caches (and announces) a block of generated tokens once it is full; the emulator
    does too, hashing the tokens it streams, chained after the prompt's blocks."""
    e = fleet.endpoints()[0]
    sub = await _subscribed(e["kv_events_endpoint"], e["url"])
    try:
        prompt = list(("O" * 40).encode())
        body = await _complete(e["url"], "O" * 40, max_tokens=60)  # 40 + 59: 3 full blocks
        stored: list[dict[str, Any]] = []
        async with asyncio.timeout(BOUND_S):
            while sum(len(ev["block_hashes"]) for ev in stored) < 3:
                for _, _, (_, events, _) in await sub.batches(1):
                    stored += [ev for ev in events if ev["type"] == "BlockStored"]
        tokens = [t for ev in stored for t in ev["token_ids"]]
        hashes = [h for ev in stored for h in ev["block_hashes"]]
        assert tokens[:40] == prompt and len(tokens) == 96
        assert hashes == block_hashes(tokens, 32)  # vLLM's function of those tokens
        assert [ev["parent_block_hash"] for ev in stored] == [None, *hashes[:len(stored) - 1]]
        assert bytes(tokens[40:]).decode() == body["choices"][0]["text"][:56]
    finally:
        sub.close()


async def test_replay_answers_from_a_sequence_number(fleet: EmulatedFleet) -> None:
    e = fleet.endpoints()[1]
    for i in range(3):
        await _complete(e["url"], f"{i}" * 70)
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(e["replay_endpoint"])
    try:
        await dealer.send_multipart([b"", (1).to_bytes(8, "big")])
        got = []
        async with asyncio.timeout(BOUND_S):
            while True:
                frames = await dealer.recv_multipart()
                assert frames[0] == b"" and len(frames) == 4
                if frames[2] == (-1).to_bytes(8, "big", signed=True):
                    assert frames[1] == b"" and frames[3] == b""
                    break
                assert frames[1] == b""
                got.append(int.from_bytes(frames[2], "big"))
        assert got == [1, 2]
    finally:
        ctx.destroy(linger=0)


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


async def test_metrics_have_vllms_names_labels_and_buckets(fleet: EmulatedFleet) -> None:
    from kvroute_emulator.metrics import SERIES

    e = fleet.endpoints()[0]
    await _complete(e["url"], "M" * 100)
    await _complete(e["url"], "M" * 100)  # three full blocks hit
    async with aiohttp.ClientSession() as s, s.get(f"{e['url']}/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        ours = _families(await r.text())
    real = _families((FIXTURES / "vllm-0.32-cpu-metrics.txt").read_text())
    for name in SERIES:
        family = name.removesuffix("_total")
        assert family in ours and family in real, name
        assert ours[family].type == real[family].type, name
        label_sets = {(s.name, frozenset(s.labels)) for s in ours[family].samples}
        real_sets = {(s.name, frozenset(s.labels)) for s in real[family].samples
                     if not s.name.endswith("_created")}
        assert label_sets == real_sets, name
        if ours[family].type == "histogram":
            bounds = [s.labels["le"] for s in ours[family].samples if s.name.endswith("_bucket")]
            real_bounds = [s.labels["le"] for s in real[family].samples
                           if s.name.endswith("_bucket")]
            assert bounds == real_bounds, name
    values = {s.name: s.value for f in ours.values() for s in f.samples if "le" not in s.labels}
    assert values["vllm:prefix_cache_queries_total"] == 200
    assert values["vllm:prefix_cache_hits_total"] == 96
    assert values["vllm:generation_tokens_total"] == 4
    assert values["vllm:time_to_first_token_seconds_count"] == 2


async def test_metrics_slash_restricts_to_the_named_samples_as_vllm_does(
        fleet: EmulatedFleet) -> None:
    """vLLM 0.32 answers ``/metrics/?name[]=...`` from its mounted prometheus_client app
    (only those samples, with their families' HELP/TYPE) and ignores ``name[]`` on
    ``/metrics``; the router's scraper relies on the first (tests/e2e checks the real one)."""
    e = fleet.endpoints()[0]
    await _complete(e["url"], "R" * 40)
    query = [("name[]", "vllm:num_requests_running"), ("name[]", "vllm:prefix_cache_hits_total"),
             ("name[]", "vllm:cache_config_info"), ("name[]", "vllm:no_such_series"),
             ("name[]", "vllm:e2e_request_latency_seconds_count")]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{e['url']}/metrics/", params=query) as r:
            assert r.status == 200
            restricted = await r.text()
        async with s.get(f"{e['url']}/metrics", params=query) as r:
            whole = await r.text()
        async with s.get(f"{e['url']}/metrics/") as r:
            unrestricted = await r.text()
    samples = {x.name for f in _families(restricted).values() for x in f.samples}
    assert samples == {"vllm:num_requests_running", "vllm:prefix_cache_hits_total",
                       "vllm:cache_config_info", "vllm:e2e_request_latency_seconds_count"}
    assert restricted.count("# TYPE ") == 4 and "_bucket" not in restricted
    assert len(restricted) < len(whole) / 5
    assert _families(whole).keys() == _families(unrestricted).keys()
    assert "vllm:time_to_first_token_seconds" in _families(whole)


async def test_lru_eviction_publishes_block_removed(model_dir: Path) -> None:
    profile = cpu_test_engine(kv_blocks=8)
    f = EmulatedFleet(FleetConfig(count=1, profile=profile, model_dir=model_dir,
                                  served_model_name=MODEL, time_scale=0.01, max_model_len=256))
    await f.start()
    try:
        e = f.endpoints()[0]
        sub = await _subscribed(e["kv_events_endpoint"], e["url"])
        try:
            # Forget the probes' blocks (they would be evicted first, being older).
            async with aiohttp.ClientSession() as s, s.post(
                    f"{e['url']}/reset_prefix_cache") as r:
                assert (await r.json())["success"] is True
            [(_, _, (_, cleared, _))] = await sub.batches(1)
            assert cleared == [{"type": "AllBlocksCleared"}]
            removed: list[int] = []
            first = block_hashes(list(("X" * 128).encode()), 32)
            for ch in "XYZW":
                await _complete(e["url"], ch * 128, max_tokens=1)
                for _, _, (_, events, _) in await sub.batches(1):
                    for ev in events:
                        if ev["type"] == "BlockRemoved":
                            removed.extend(ev["block_hashes"])
                while await sub.sock.poll(50):
                    _, _, payload = await sub.sock.recv_multipart()
                    for ev in msgspec.msgpack.decode(payload)[1]:
                        if ev["type"] == "BlockRemoved":
                            removed.extend(ev["block_hashes"])
            # 8 blocks hold two 4-block prompts: the oldest ("X") went first, LRU.
            assert set(first) <= set(removed)
        finally:
            sub.close()
    finally:
        await f.stop()
