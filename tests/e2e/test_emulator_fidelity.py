"""The emulator against a real vLLM-CPU engine: the same prompts give the same token ids, the
same ``BlockStored`` hash chains, the same metric names and labels and the same SSE framing.

The emulated fleet serves the real engines' model folder (its tokenizer and chat template) with
the CPU profile and the same block size. The reference is the real engine only: nothing here
consults the router. Waits are bounded conditions (a hang fails, naming what it waited for);
nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio
from kvroute_bench import promtext
from kvroute_cli.localengines import LocalEngineFleet
from kvroute_emulator.fleet import EmulatedFleet, FleetConfig, fleet_in_thread
from kvroute_emulator.metrics import SERIES
from kvroute_emulator.model.profile import cpu_test_engine
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e
MODEL = "kvroute-test-model"
BOUND_S = 240.0


@pytest.fixture(scope="module")
def emulated(engine_fleet: LocalEngineFleet) -> Iterator[EmulatedFleet]:
    config = FleetConfig(count=1, profile=cpu_test_engine(kv_blocks=4096),
                         model_dir=engine_fleet.workdir / "model", served_model_name=MODEL,
                         max_model_len=engine_fleet.max_model_len)
    with fleet_in_thread(config) as fleet:
        yield fleet


def _urls(engine_fleet: LocalEngineFleet, emulated: EmulatedFleet) -> dict[str, dict[str, str]]:
    real = engine_fleet.engines[0]
    emu = emulated.endpoints()[0]
    return {"real": {"url": real.url, "events": real.kv_events_endpoint},
            "emulated": {"url": emu["url"], "events": emu["kv_events_endpoint"]}}


async def _post(session: aiohttp.ClientSession, url: str, body: Any) -> Any:
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_same_token_ids_and_usage(engine_fleet: LocalEngineFleet,
                                        emulated: EmulatedFleet) -> None:
    tag = uuid.uuid4().hex
    prompt = f"[{tag}] Fidelity: héllo wörld, ünïcode and\ttabs\n" * 3
    messages = [{"role": "system", "content": f"system {tag}"},
                {"role": "user", "content": "What is a KV cache?"},
                {"role": "assistant", "content": "A store of attention keys."},
                {"role": "user", "content": [{"type": "text", "text": "And prefix caching?"}]}]
    got: dict[str, list[Any]] = {}
    async with aiohttp.ClientSession() as s:
        for side, u in _urls(engine_fleet, emulated).items():
            url = u["url"]
            tp = await _post(s, f"{url}/tokenize", {"model": MODEL, "prompt": prompt})
            tc = await _post(s, f"{url}/tokenize", {"model": MODEL, "messages": messages})
            comp = await _post(s, f"{url}/v1/completions", {
                "model": MODEL, "prompt": prompt, "max_tokens": 4, "ignore_eos": True})
            chat = await _post(s, f"{url}/v1/chat/completions", {
                "model": MODEL, "messages": messages, "max_tokens": 3, "ignore_eos": True})
            got[side] = [tp["tokens"], tc["tokens"], comp["usage"], chat["usage"],
                         sorted(comp), sorted(chat), sorted(comp["choices"][0]),
                         sorted(chat["choices"][0]), sorted(chat["choices"][0]["message"])]
    assert got["emulated"] == got["real"]


async def test_same_answers_to_the_priority_field(engine_fleet: LocalEngineFleet,
                                                  emulated: EmulatedFleet) -> None:
    """Both engines run vLLM's default fcfs policy: an integer ``priority`` is accepted (and
    ignored), a string is a 400 whose error names the field."""
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/v1/completions", {"prompt": "priority check"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "priority"}]})]
    got: dict[str, list[Any]] = {}
    async with aiohttp.ClientSession() as s:
        for side, u in _urls(engine_fleet, emulated).items():
            got[side] = []
            for path, base in cases:
                for priority in (3, "high"):
                    async with s.post(f"{u['url']}{path}", json={
                            "model": MODEL, "max_tokens": 1, **base,
                            "priority": priority}) as r:
                        answer = await r.json(content_type=None)
                    error = answer.get("error") or {}
                    # vLLM names a body field's validation error "body.priority"; the
                    # emulator, as for every parameter, "priority".
                    got[side].append((path, priority, r.status,
                                      str(error.get("param", "")).endswith("priority"),
                                      error.get("code")))
    assert got["emulated"] == got["real"]
    assert [status for _, _, status, _, _ in got["real"]] == [200, 400, 200, 400]
    assert all(named for _, priority, _, named, _ in got["real"] if priority == "high")


class Subscriber:
    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.topics: set[bytes] = set()

    async def stored_chain(self, first_tokens: list[int]) -> tuple[list[int], dict[str, Any]]:
        """The ``BlockStored`` hashes of the chain that starts with ``first_tokens``."""
        async with asyncio.timeout(BOUND_S):
            while True:
                topic, _, payload = await self.sock.recv_multipart()
                self.topics.add(topic)
                for event in msgspec.msgpack.decode(payload)[1]:
                    if (event.get("type") == "BlockStored" and event["parent_block_hash"] is None
                            and event["token_ids"][:len(first_tokens)] == first_tokens):
                        return list(event["block_hashes"]), event

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


async def _live(session: aiohttp.ClientSession, sub: Subscriber, url: str) -> None:
    """Probe until the subscription receives (a PUB socket drops what precedes a SUB's join)."""
    async with asyncio.timeout(BOUND_S):
        for _ in range(1000):
            await _post(session, f"{url}/v1/completions", {
                "model": MODEL, "prompt": f"probe {uuid.uuid4().hex} " + "p" * 64,
                "max_tokens": 1})
            if await sub.sock.poll(500):
                await _events(sub, wait_ms=200)  # drained: the probes' own events
                return


async def test_same_block_stored_chains(engine_fleet: LocalEngineFleet,
                                        emulated: EmulatedFleet) -> None:
    tag = uuid.uuid4().hex
    # 100 prompt tokens + 2 output tokens stay inside 4 blocks of 32: blocks that output tokens
    # fill are cached too, but their hashes depend on what each engine generates (the next
    # test compares their shape).
    prompt = (f"[{tag}] " + "shared context " * 10)[:100]
    messages = [{"role": "user", "content": f"{tag} " + "question " * 20}]
    chains: dict[str, list[Any]] = {}
    async with aiohttp.ClientSession() as s:
        for side, u in _urls(engine_fleet, emulated).items():
            sub = Subscriber(u["events"])
            try:
                await _live(s, sub, u["url"])
                ids = (await _post(s, f"{u['url']}/tokenize", {"model": MODEL,
                                                                "prompt": prompt}))["tokens"]
                await _post(s, f"{u['url']}/v1/completions", {
                    "model": MODEL, "prompt": prompt, "max_tokens": 2, "ignore_eos": True})
                completion, event = await sub.stored_chain(ids[:32])
                chat_ids = (await _post(s, f"{u['url']}/tokenize", {
                    "model": MODEL, "messages": messages}))["tokens"]
                await _post(s, f"{u['url']}/v1/chat/completions", {
                    "model": MODEL, "messages": messages, "max_tokens": 1, "ignore_eos": True})
                chat, _ = await sub.stored_chain(chat_ids[:32])
                # The topic frame too: the real engine runs vLLM's default --kv-events-config
                # topic, which vllm-router's --kv-event-source matches exactly.
                chains[side] = [completion, chat[:len(chat_ids) // 32], sorted(event),
                                event["block_size"], event["medium"], sorted(sub.topics)]
            finally:
                sub.close()
    assert chains["emulated"] == chains["real"]
    assert len(chains["real"][0]) == 3


def _shape(chunk: dict[str, Any]) -> tuple[Any, ...]:
    choices = chunk.get("choices") or [{}]
    choice = choices[0]
    return (tuple(sorted(chunk)), tuple(sorted(choice)), tuple(sorted(choice.get("delta", {}))),
            choice.get("finish_reason"), tuple(sorted(chunk.get("usage") or {})))


async def test_same_sse_framing(engine_fleet: LocalEngineFleet,
                                emulated: EmulatedFleet) -> None:
    bodies = [
        ("/v1/completions", {"model": MODEL, "prompt": "C" * 40, "max_tokens": 3,
                             "ignore_eos": True, "stream": True,
                             "stream_options": {"include_usage": True}}),
        ("/v1/completions", {"model": MODEL, "prompt": "E" * 40, "max_tokens": 3,
                             "ignore_eos": True, "stream": True}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user",
                                                                "content": "D" * 40}],
                                  "max_tokens": 3, "ignore_eos": True, "stream": True,
                                  "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user",
                                                                "content": "F" * 40}],
                                  "max_tokens": 3, "ignore_eos": True, "stream": True}),
    ]
    shapes: dict[str, list[Any]] = {}
    async with aiohttp.ClientSession() as s:
        for side, u in _urls(engine_fleet, emulated).items():
            shapes[side] = []
            for path, body in bodies:
                async with s.post(f"{u['url']}{path}", json=body) as r:
                    ctype = r.headers["Content-Type"]
                    events = (await r.text()).split("\n\n")
                assert events[-2:] == ["data: [DONE]", ""]
                assert all(e.startswith("data: ") for e in events[:-1])
                chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
                shapes[side].append((ctype, _runs([_shape(c) for c in chunks])))
    assert shapes["emulated"] == shapes["real"]


def _runs(shapes: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """``shapes`` with consecutive repeats collapsed: the framing, not the number of token
    events. A loaded vLLM merges tokens queued between two of its output steps into one event
    (seen on a cold CI run: two token events instead of three), so counts differ by load."""
    return [shape for i, shape in enumerate(shapes) if i == 0 or shapes[i - 1] != shape]


async def test_same_metric_names_and_labels(engine_fleet: LocalEngineFleet,
                                            emulated: EmulatedFleet) -> None:
    pages = {}
    async with aiohttp.ClientSession() as s:
        for side, u in _urls(engine_fleet, emulated).items():
            async with s.get(f"{u['url']}/metrics") as r:
                pages[side] = {f.name: f for f in text_string_to_metric_families(await r.text())}
    for name in SERIES:
        family = name.removesuffix("_total")
        real, ours = pages["real"][family], pages["emulated"][family]
        assert ours.type == real.type, name
        real_sets = {(x.name, frozenset(x.labels)) for x in real.samples
                     if not x.name.endswith("_created")}
        assert {(x.name, frozenset(x.labels)) for x in ours.samples} == real_sets, name


async def _prefix_hits(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(f"{url}/metrics") as r:
        return promtext.total(promtext.parse(await r.text()), promtext.PREFIX_HITS)


async def test_identical_prompts_sent_together_are_computed_once(
        engine_fleet: LocalEngineFleet, emulated: EmulatedFleet) -> None:
    """vLLM caches a block when the step that fills it is scheduled, so of identical prompts
    that arrive together (admitted in one step, or while the first is still prefilling) only
    the first computes the prefix: the others hit every full block but the last token's. The
    emulator must count the same hits (it once computed each copy admitted in one step)."""
    hits: dict[str, float] = {}
    async with aiohttp.ClientSession() as s:
        for side, u in _urls(engine_fleet, emulated).items():
            url = u["url"]
            prompt = f"[{uuid.uuid4().hex}] " + "x z" * 120
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "ignore_eos": True}
            # A long decode keeps the engine stepping, so the copies arrive within a step.
            busy = asyncio.create_task(_post(s, f"{url}/v1/completions", {
                "model": MODEL, "prompt": f"[{uuid.uuid4().hex}] busy", "max_tokens": 60,
                "ignore_eos": True}))
            await asyncio.sleep(0.3)
            before = await _prefix_hits(s, url)
            async with asyncio.timeout(BOUND_S):
                answers = await asyncio.gather(*[_post(s, f"{url}/v1/completions", body)
                                                 for _ in range(4)])
                await busy
            hits[side] = await _prefix_hits(s, url) - before
            full = (answers[0]["usage"]["prompt_tokens"] - 1) // 32 * 32
    assert hits["real"] == 3 * full, hits
    assert hits["emulated"] == hits["real"]


async def test_same_restricted_metrics_page(engine_fleet: LocalEngineFleet,
                                            emulated: EmulatedFleet) -> None:
    """The router's scraper asks for ``/metrics/?name[]=...`` (only the series it reads): a
    real vLLM answers it from its mounted prometheus_client app, and so must the emulator —
    the same samples and label names, the whole page a multiple of the restricted one, and
    what the router parses from it the same as from the whole page."""
    from kvroute_router.scrape.scraper import FILTERED_PATH
    from kvroute_router.scrape.vllm_metrics import RUNNING, parse_vllm_metrics

    restricted, whole = {}, {}
    async with aiohttp.ClientSession() as s:
        for side, u in _urls(engine_fleet, emulated).items():
            async with s.get(f"{u['url']}{FILTERED_PATH}", headers={"Accept": "text/plain"}) as r:
                assert r.status == 200, side
                restricted[side] = await r.text()
            async with s.get(f"{u['url']}/metrics") as r:
                whole[side] = await r.text()
    shapes = {side: {(x.name, frozenset(x.labels)) for f in
                     text_string_to_metric_families(page) for x in f.samples
                     if not x.name.endswith("_created")}
              for side, page in restricted.items()}
    assert shapes["emulated"] == shapes["real"]
    assert RUNNING in {name for name, _ in shapes["real"]}
    for side in restricted:
        assert len(restricted[side]) * 5 < len(whole[side]), side
        ours, theirs = (parse_vllm_metrics(restricted[side], 0.0),
                        parse_vllm_metrics(whole[side], 0.0))
        assert (ours.block_size, ours.num_gpu_blocks, ours.hash_algo) == (
            theirs.block_size, theirs.num_gpu_blocks, theirs.hash_algo), side
        assert ours.block_size is not None and ours.hash_algo == "sha256_cbor", side


SMALL_CACHE_BLOCKS = 48
"""KV blocks of the small-cache pair (vLLM keeps one as its null block)."""


@pytest.fixture(scope="module")
def small_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real engine whose KV cache holds 48 blocks of 32 tokens (``--num-gpu-blocks-override``)
    and an emulated one holding as many usable blocks: eviction is reached in a few requests.
    Both run one sequence at a time under vLLM's ``priority`` scheduling policy, so a queue
    forms behind one long request and its order is the policy's (sequential requests, as the
    eviction test sends, are served as under fcfs)."""
    real = LocalEngineFleet(
        count=1, workdir=Path(tmp_path_factory.mktemp("small-cache")), max_model_len=512,
        extra_args=["--num-gpu-blocks-override", str(SMALL_CACHE_BLOCKS),
                    "--scheduling-policy", "priority", "--max-num-seqs", "1"],
        startup_timeout_s=float(os.environ.get("KVROUTE_E2E_STARTUP_S", "300")))
    real.start(progress=True)
    try:
        profile = dataclasses.replace(cpu_test_engine(kv_blocks=SMALL_CACHE_BLOCKS - 1),
                                      max_num_seqs=1)
        config = FleetConfig(count=1, profile=profile, model_dir=real.workdir / "model",
                             served_model_name=MODEL, max_model_len=512,
                             scheduling_policy="priority")
        with fleet_in_thread(config) as fleet:
            emu = fleet.endpoints()[0]
            yield {"real": real.engines[0].url, "real-events": real.engines[0].kv_events_endpoint,
                   "emulated": emu["url"], "emulated-events": emu["kv_events_endpoint"]}
    finally:
        real.stop()


async def _events(sub: Subscriber, wait_ms: int = 300) -> list[dict[str, Any]]:
    """Every event that arrives until the stream is quiet for ``wait_ms``."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(BOUND_S):
        while await sub.sock.poll(wait_ms):
            _, _, payload = await sub.sock.recv_multipart()
            events += msgspec.msgpack.decode(payload)[1]
    return events


async def test_same_output_blocks_and_eviction_order(small_caches: dict[str, str]) -> None:
    """A request whose output fills blocks, then fillers until its blocks are evicted: both
    engines announce the same blocks in the same events (output blocks as decoding fills them)
    and evict them in the same order — vLLM frees a request's blocks last first, so its tail
    goes before its prompt's first block."""
    seen: dict[str, dict[str, list[Any]]] = {}
    prompt = f"[{uuid.uuid4().hex}] " + "x" * 118  # 153 tokens: 4 full blocks
    async with aiohttp.ClientSession() as s:
        for side in ("real", "emulated"):
            url = small_caches[side]
            sub = Subscriber(small_caches[f"{side}-events"])
            try:
                await _live(s, sub, url)
                ids = (await _post(s, f"{url}/tokenize", {"model": MODEL,
                                                          "prompt": prompt}))["tokens"]
                await _post(s, f"{url}/v1/completions", {
                    "model": MODEL, "prompt": prompt, "max_tokens": 40, "ignore_eos": True})
                chain: list[int] = []
                shapes: list[tuple[int, int, bool]] = []
                async with asyncio.timeout(BOUND_S):
                    while not chain:  # the answer is back: its blocks are announced by now
                        for ev in await _events(sub, wait_ms=1000):
                            starts = ev.get("parent_block_hash") is None and \
                                ev.get("token_ids", [])[:32] == ids[:32]
                            if ev["type"] == "BlockStored" and (
                                    starts or (chain and ev["parent_block_hash"] == chain[-1])):
                                chain += ev["block_hashes"]
                                shapes.append((len(ev["block_hashes"]), len(ev["token_ids"]),
                                               starts))
                removed: list[int] = []
                for i in range(80):  # bounded: ~12 fillers push the request out
                    await _post(s, f"{url}/v1/completions", {
                        "model": MODEL, "prompt": f"[{uuid.uuid4().hex} {i}] " + "y" * 64,
                        "max_tokens": 1, "ignore_eos": True})
                    removed += [chain.index(h) for ev in await _events(sub)
                                if ev["type"] == "BlockRemoved"
                                for h in ev["block_hashes"] if h in chain]
                    if len(removed) == len(chain):
                        break
                seen[side] = {"stored": shapes, "prompt": chain[:len(ids) // 32],
                              "removed": removed}
            finally:
                sub.close()
    assert seen["emulated"]["stored"] == seen["real"]["stored"]
    assert seen["emulated"]["prompt"] == seen["real"]["prompt"]
    assert seen["emulated"]["removed"] == seen["real"]["removed"]
    assert seen["real"]["stored"] == [(4, 128, True), (1, 32, False), (1, 32, False)]
    assert seen["real"]["removed"] == [5, 4, 3, 2, 1, 0]


async def _engine_queue(session: aiohttp.ClientSession, url: str) -> tuple[float, float, float]:
    """The engine's running and waiting gauges and finished-request counter, from ``/metrics``."""
    async with session.get(f"{url}/metrics") as r:
        assert r.status == 200, await r.text()
        samples = promtext.parse(await r.text())
    return (promtext.total(samples, "vllm:num_requests_running"),
            promtext.total(samples, "vllm:num_requests_waiting"),
            promtext.total(samples, promtext.REQUESTS))


async def _until_admitted(session: aiohttp.ClientSession, url: str, count: int,
                          finished_before: float) -> tuple[float, float]:
    """Scrape ``/metrics`` back to back until ``count`` requests (those sent since the finished
    counter read ``finished_before``) are running, waiting or finished; returns how many were
    running, and how many had finished, at that scrape. No timed waits: on these machines a
    timed wake-up of the client (an ``asyncio.sleep``, an epoll timeout) came up to seconds late
    while the CPU engine ran, though socket reads woke it at once."""
    for _ in range(100_000):
        running, waiting, finished = await _engine_queue(session, url)
        if running + waiting + finished - finished_before >= count:
            return running, finished - finished_before
        await asyncio.sleep(0)
    raise AssertionError(f"{url}: {count} requests never showed in the engine's queue")


QUEUE_TRIES = 4
"""Tries at forming the queue in the newest-first test before it fails: on these machines the
engine's frontend was seen to stall for seconds (its gauges and answers stale) while the engine
core ran, so the short requests reached the engine only after the leads had ended."""

TRY_S = 90.0
"""Bound on one try of the newest-first test (about 15 s here when nothing stalls). CI once
spent the whole of ``BOUND_S`` in one try, waiting for the gauges to count the arrival-ranked
request (a ``/metrics`` read was still unanswered at the end): such a try is abandoned (its
requests cancelled, which aborts them in vLLM), the engine left to drain, and the next try
starts from an idle engine."""


async def _until_idle(session: aiohttp.ClientSession, url: str) -> None:
    """Scrape ``/metrics`` until nothing runs or waits in the engine (after an abandoned try)."""
    async with asyncio.timeout(BOUND_S):
        while True:
            try:  # an unanswered read is dropped and retried
                async with asyncio.timeout(TRY_S / 6):
                    running, waiting, _ = await _engine_queue(session, url)
            except TimeoutError:
                continue
            if running + waiting == 0:
                return
            await asyncio.sleep(0.2)


async def _newest_first_try(session: aiohttp.ClientSession, url: str, sub: Subscriber,
                            names: tuple[str, ...]) -> tuple[str, list[str]]:
    """One try of the newest-first test, bounded by ``TRY_S``: why no queue formed ("" when it
    did: both short requests waited behind a lead at the engine step that first counted both),
    and the order the engine's KV events announce each request's first block."""
    tasks: list[asyncio.Task[None]] = []
    try:
        async with asyncio.timeout(TRY_S):
            return await _newest_first_sent(session, url, sub, names, tasks)
    except TimeoutError:
        await _cancel(tasks)
        await _until_idle(session, url)
        await _events(sub)  # drained: the abandoned requests' own events
        return f"a try passed {TRY_S:.0f} s and was abandoned", []
    finally:
        await _cancel(tasks)  # a failed assertion, too, leaves no request of this try running


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _newest_first_sent(session: aiohttp.ClientSession, url: str, sub: Subscriber,
                             names: tuple[str, ...],
                             tasks: list[asyncio.Task[None]]) -> tuple[str, list[str]]:
    """The newest-first try itself; every request it sends is a task added to ``tasks``."""
    leads_named = names[:-2]
    prompts = {name: f"[{uuid.uuid4().hex}] {name} " + "z " * 12 for name in names}
    heads: dict[str, list[int]] = {}
    lengths: dict[str, int] = {}
    for name, prompt in prompts.items():
        ids = (await _post(session, f"{url}/tokenize", {"model": MODEL,
                                                        "prompt": prompt}))["tokens"]
        assert len(ids) >= 32, f"{name}: {len(ids)} tokens fill no block"
        heads[name] = ids[:16]
        lengths[name] = len(ids)

    async def send(name: str, priority: int, max_tokens: int = 2) -> None:
        await _post(session, f"{url}/v1/completions", {
            "model": MODEL, "prompt": prompts[name], "max_tokens": max_tokens,
            "ignore_eos": True, "priority": priority})

    now_ms = int(time.time() * 1000)
    before = (await _engine_queue(session, url))[2]
    tasks += [asyncio.create_task(send(name, -(now_ms + 1000), 500 - lengths[name]))
              for name in leads_named]
    await _until_admitted(session, url, len(leads_named), before)
    tasks.append(asyncio.create_task(send("arrival-ranked", now_ms + 1)))
    # it reaches the engine's queue first: under fcfs it would go first
    await _until_admitted(session, url, len(leads_named) + 1, before)
    tasks.append(asyncio.create_task(send("newest-first", -(now_ms + 2))))
    running, finished = await _until_admitted(session, url, len(names), before)
    await asyncio.gather(*tasks)
    order = [name for ev in await _events(sub, wait_ms=1000)
             if ev["type"] == "BlockStored" and ev["parent_block_hash"] is None
             for name, head in heads.items() if ev["token_ids"][:16] == head]
    if running >= 1 and finished < len(leads_named):
        return "", order
    return "the lead requests ended before the queue formed (the engine's frontend lagged)", order


async def test_a_newest_first_request_overtakes_the_queue(small_caches: dict[str, str]) -> None:
    """What the router sends for a request its admission queue let go newest-first
    (``spec.admission.newestFirstAfterMs``): the arrival in unix ms, negated, as the vLLM
    ``priority``. A real engine under ``--scheduling-policy priority`` accepts it and schedules
    it before an arrival-ranked request (a positive unix-ms priority) that reached the queue
    earlier; the emulator does the same.

    One sequence runs at a time, and six long lead requests ranked before both (a lower priority
    still) hold the engine for several seconds. Each request is sent once the engine's gauges count
    the one before it, and a lead must still be unfinished once the last is counted (else no queue
    formed: the test tries again, ``QUEUE_TRIES`` in all, each bounded by ``TRY_S``, then says so).
    The order is the engine's own: the order its KV events announce each request's first block
    (stored when the request is scheduled). Not the order answers reach this client: on a loaded CI
    machine a streamed request's end reached the client after later short answers, and this
    client's timed waits overslept by seconds.
    """
    leads_named = tuple(f"lead-{i}" for i in range(1, 7))
    names = (*leads_named, "arrival-ranked", "newest-first")
    order: dict[str, list[str]] = {}
    async with aiohttp.ClientSession() as s:
        for side in ("real", "emulated"):
            url = small_caches[side]
            sub = Subscriber(small_caches[f"{side}-events"])
            try:
                await _live(s, sub, url)
                missed: list[str] = []
                for _ in range(QUEUE_TRIES):
                    why, order[side] = await _newest_first_try(s, url, sub, names)
                    if not why:
                        break
                    missed.append(why)
                assert len(missed) < QUEUE_TRIES, (f"{side}: no queue formed in {QUEUE_TRIES} "
                                                   f"tries: {missed}")
            finally:
                sub.close()
    for side in ("real", "emulated"):  # the leads share a priority: among them, arrival order
        assert sorted(order[side][:6]) == list(leads_named), (side, order[side])
        assert order[side][6:] == ["newest-first", "arrival-ranked"], (side, order[side])
