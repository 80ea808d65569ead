"""Precise prefix routing against real vLLM-CPU engines and their real KV events.

* prompts sent *directly* to one engine (no router) are then found in the index on that engine,
  and the ``prefix-precise`` scorer rates it best for nearly all of them;
* the in-process tokenizer agrees with the engine's own ``/tokenize``;
* with a tiny KV cache the engine evicts, the index follows the evictions, and the eviction
  forecast made at dispatch names blocks the engine then evicts;
* an engine restarted on the same ports is detected and its blocks dropped.

Waits are conditions with deadlines (the engines are slow on shared CPUs); nothing asserts on
timing. Every wait is bounded well inside pytest's 600 s timeout and names what it waited for:
a hang is a failure that says where it hung, not a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from kvroute_cli.localengines import LocalEngineFleet
from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint, EndpointMetrics
from kvroute_router.framework.request import LLMRequest
from kvroute_router.kvevents.hashing import BlockHashConfig, engine_seed_from_environment
from kvroute_router.kvevents.hub import PoolKVEvents
from kvroute_router.kvevents.subscriber import KVEventSource
from kvroute_router.kvevents.tokenization import PromptTokenizer
from kvroute_router.openai.requests import parse_request
from kvroute_router.plugins.prefix_approx import ApproxPrefixIndex, ApproxPrefixScorer
from kvroute_router.plugins.prefix_precise import PrecisePrefixScorer
from kvroute_router.scrape.vllm_metrics import parse_vllm_metrics

pytestmark = pytest.mark.e2e
MODEL = "kvroute-test-model"
FILLER = ("The quick brown fox jumps over the lazy dog while the router keeps count of "
          "every block it has seen on every engine in the pool. ")


def hash_config(fleet: LocalEngineFleet) -> BlockHashConfig:
    return BlockHashConfig(block_size=fleet.block_size, algorithm="sha256_cbor",
                           seed=engine_seed_from_environment())


def sources(fleet: LocalEngineFleet) -> list[KVEventSource]:
    return [KVEventSource(f"engine-{e.index}", e.kv_events_endpoint, e.replay_endpoint)
            for e in fleet.engines]


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 120.0,
                     state: Callable[[], object] | None = None) -> None:
    """Wait for ``condition``; on timeout the message names ``what`` and, when given, the
    ``state`` it was in (which half of a compound condition failed)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            seen = f"; state: {state()}" if state is not None else ""
            raise AssertionError(f"timed out waiting for {what}{seen}")
        await asyncio.sleep(0.1)


async def complete(session: aiohttp.ClientSession, url: str, prompt: str) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    async with session.post(f"{url}/v1/completions", json=body,
                            timeout=aiohttp.ClientTimeout(total=120)) as resp:
        assert resp.status == 200, await resp.text()


@pytest.fixture
async def pool_events(engine_fleet: LocalEngineFleet) -> AsyncIterator[PoolKVEvents]:
    tokenizer = PromptTokenizer.from_directory(engine_fleet.workdir / "model")
    events = PoolKVEvents(hash_config(engine_fleet), tokenizer=tokenizer)
    await events.set_sources(sources(engine_fleet))
    try:
        await eventually(lambda: all(events.trustworthy(s.endpoint)
                                     for s in sources(engine_fleet)), "subscribers in sync")
        yield events
    finally:
        await closed_promptly(events)


async def scrape(session: aiohttp.ClientSession, url: str) -> EndpointMetrics:
    """The engine's ``/metrics``, parsed as the router's scraper parses it."""
    async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=60)) as resp:
        assert resp.status == 200, await resp.text()
        return parse_vllm_metrics(await resp.text(), time.monotonic())


async def closed_promptly(events: PoolKVEvents) -> None:
    """Close the subscribers; a close that hangs fails here, naming itself (issue 12)."""
    try:
        async with asyncio.timeout(10.0):
            await events.aclose()
    except TimeoutError:
        raise AssertionError("PoolKVEvents.aclose() did not return within 10 s") from None


async def test_tokenizer_matches_engine_tokenize(engine_fleet: LocalEngineFleet,
                                                 pool_events: PoolKVEvents,
                                                 unique_prompt: str) -> None:
    tokenizer = pool_events.tokenizer
    assert tokenizer is not None
    url = engine_fleet.engines[0].url
    bodies: list[tuple[str, dict[str, object]]] = [
        ("completions", {"prompt": unique_prompt + "héllo wörld ✓"}),
        ("completions", {"prompt": unique_prompt, "add_special_tokens": False}),
        ("chat", {"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": unique_prompt + "Hi"}]}),
        ("chat", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": unique_prompt}, {"type": "text", "text": "two parts"}]}],
            "add_generation_prompt": False}),
    ]
    async with aiohttp.ClientSession() as session:
        for kind, body in bodies:
            ours = tokenizer.tokenize(kind, body)
            fresh = PromptTokenizer.from_directory(engine_fleet.workdir / "model")
            engines = await fresh.tokenize_via_engine(session, url, MODEL, kind, body)
            assert ours is not None and ours == engines, (kind, body)


async def test_prompts_sent_directly_are_routed_to_their_engine(
        engine_fleet: LocalEngineFleet, pool_events: PoolKVEvents) -> None:
    target = engine_fleet.engines[0]
    endpoints = [Endpoint(name=f"engine-{e.index}", address=e.address, pool="local")
                 for e in engine_fleet.engines]
    prompts = [f"[{uuid.uuid4().hex}] {FILLER * 3}" for _ in range(12)]
    async with aiohttp.ClientSession() as session:
        for prompt in prompts:
            await complete(session, target.url, prompt)
    scorer = PrecisePrefixScorer(pool_events, ApproxPrefixScorer(ApproxPrefixIndex(), 64,
                                                                 engine_fleet.block_size))
    expected_blocks = [len(pool_events.hasher.block_hashes(
        pool_events.tokenizer.tokenize("completions", {"prompt": p}) or []))
        for p in prompts] if pool_events.tokenizer else []

    def indexed() -> bool:
        assert pool_events.tokenizer is not None
        return all(pool_events.index.match(pool_events.hasher.block_hashes(
            pool_events.tokenizer.tokenize("completions", {"prompt": p}) or []),
            ["engine-0"])["engine-0"] == n for p, n in zip(prompts, expected_blocks,
                                                          strict=True))

    await eventually(indexed, "every prompt's blocks indexed on engine-0")
    picked_target = 0
    for prompt in prompts:
        request = LLMRequest.from_openai(
            parse_request({"model": MODEL, "prompt": prompt}, "completions"), {})
        scores = scorer.score(CycleState(), request, endpoints)
        if scores[0] > scores[1]:
            picked_target += 1
    assert picked_target >= len(prompts) - 1, f"{picked_target}/{len(prompts)}"
    for name in ("engine-0", "engine-1"):
        status = pool_events.status(name)
        assert status is not None
        assert status.hash_check.state != "mismatch", status.as_dict()
    check = pool_events.status("engine-0")
    assert check is not None and check.hash_check.matched > 0


async def test_evictions_and_restart_are_followed(tmp_path: Path) -> None:
    """One engine with a 64-block KV cache: evictions, then a restart on the same ports."""
    fleet = LocalEngineFleet(count=1, workdir=tmp_path, max_model_len=1024,
                             extra_args=["--num-gpu-blocks-override", "64"],
                             startup_timeout_s=200.0)
    await asyncio.to_thread(fleet.start)
    engine = fleet.engines[0]
    tokenizer = PromptTokenizer.from_directory(tmp_path / "model")
    events = PoolKVEvents(hash_config(fleet), tokenizer=tokenizer)
    try:
        await events.set_sources(sources(fleet))
        await eventually(lambda: events.trustworthy("engine-0"), "subscriber in sync")
        prompts = [f"[{uuid.uuid4().hex}] {FILLER * 4}" for _ in range(8)]
        hashes = [events.hasher.block_hashes(tokenizer.tokenize("completions", {"prompt": p})
                                             or []) for p in prompts]
        # Each prompt is dispatched as the router does it: the scorer marks its blocks
        # pending with the capacity the engine's own /metrics reports, which forecasts the
        # evictions the prompt causes before the engine publishes them.
        scorer = PrecisePrefixScorer(events, ApproxPrefixScorer(ApproxPrefixIndex(), 64,
                                                                fleet.block_size))
        async with aiohttp.ClientSession() as session:
            endpoint = Endpoint(name="engine-0", address=engine.address, pool="local",
                                metrics=await scrape(session, engine.url))
            assert endpoint.metrics is not None and endpoint.metrics.num_gpu_blocks == 64
            for prompt in prompts:
                scorer.on_dispatch(CycleState(), LLMRequest.from_openai(
                    parse_request({"model": MODEL, "prompt": prompt}, "completions"), {}),
                    endpoint)
                await complete(session, engine.url, prompt)
        await eventually(lambda: events.index.match(hashes[-1], ["engine-0"])["engine-0"]
                         == len(hashes[-1]), "the last prompt indexed")
        removed = events.metrics.registry.get_sample_value(
            "kvroute_kv_events_decoded_total", {"endpoint": "engine-0", "type": "BlockRemoved"})
        assert removed and removed > 0, "a 64-block cache must have evicted"
        assert events.index.block_count("engine-0") <= 64
        assert events.index.match(hashes[0], ["engine-0"])["engine-0"] < len(hashes[0])
        # The forecast named blocks the engine then evicted (its BlockRemoved confirmed them),
        # and it was mostly right (measured here: 56 of 60 confirmed by the time the last
        # prompt is indexed, none restored; a block the engine kept would come back). The
        # engine's last removals may still be on their way when the last store is indexed (39
        # of 54 once, on a busy machine): wait for them, for less than the pending horizon
        # (5 s) after which an unconfirmed forecast is restored and can no longer confirm.
        def mostly_confirmed() -> bool:
            doomed, confirmed, _ = events.index.forecast_counts()["engine-0"]
            return doomed > 0 and confirmed >= 3 * doomed // 4

        with contextlib.suppress(AssertionError):  # the assertion below reports the counts
            await eventually(mostly_confirmed, "the forecast confirmed", timeout_s=3.0)
        doomed, confirmed, restored = events.index.forecast_counts()["engine-0"]
        assert doomed > 0 and confirmed >= 3 * doomed // 4, (doomed, confirmed, restored)
        assert events.metrics.registry.get_sample_value(
            "kvroute_kv_index_forecast_blocks_total",
            {"endpoint": "engine-0", "outcome": "confirmed"}) == confirmed

        # Restart the engine on the same ports: its cache is empty, its sequence restarts.
        fleet.stop()
        await eventually(lambda: not events.status("engine-0").connected,  # type: ignore[union-attr]
                         "the disconnect")
        assert not events.trustworthy("engine-0")
        await asyncio.to_thread(fleet.restart)
        async with aiohttp.ClientSession() as session:
            await complete(session, engine.url, f"[{uuid.uuid4().hex}] {FILLER}")
        status = events.status("engine-0")
        assert status is not None
        await eventually(lambda: status.restarts >= 1 and status.trustworthy,
                         "the restart detected", state=status.as_dict)
        assert events.index.match(hashes[-1], ["engine-0"])["engine-0"] == 0
        # Then the router shuts down: closing after a followed restart returns promptly.
        await closed_promptly(events)
    finally:
        await closed_promptly(events)
        fleet.stop()
