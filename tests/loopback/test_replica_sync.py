"""Replica sync against real parts: two in-process ``Router`` replicas in front of an emulated
fleet (eight vLLM-compatible engines with KV events on real ZMQ sockets), sharing their
dispatches through a real ``redis-server`` on loopback.

The engines are stalled while requests are sent, so no engine publishes a block and no request
finishes: the only way replica B can know where replica A sent a prompt is replica sync. Without
it B's scores for the prefix are zero everywhere and the load scorer sends B's request away from
A's engine, so every assertion on B's pick fails on a router without the feature."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kvroute_emulator.fleet import EmulatedFleet
from kvroute_router.app import Router, RouterSettings
from kvroute_router.replicasync.wire import DispatchRecord, encode

from tests.emulated import MODEL, emulated_fleet, fleet_pool
from tests.routers import running

pytestmark = pytest.mark.loopback

ENGINES = 8


@pytest.fixture
def redis_url(redis_server: int) -> str:
    return f"redis://127.0.0.1:{redis_server}/0"


@pytest.fixture
async def fleet(model_dir: Path) -> AsyncIterator[EmulatedFleet]:
    async with emulated_fleet(model_dir, ENGINES) as f:
        yield f


def _config(tmp_path: Path, fleet: EmulatedFleet, pending_ms: int | None = None,
            **scoring: Any) -> Path:
    pool = fleet_pool(fleet)
    if fleet.config.scheduling_policy == "priority":
        pool["spec"]["engine"]["schedulingPolicy"] = "Priority"
    if pending_ms is not None:
        pool["spec"]["engine"]["kvEvents"] = {"pendingMs": pending_ms}
    docs = [
        pool,
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy", "metadata": {"name": "chat"},
         "spec": {"match": {"model": "chat"}, "pools": [{"name": "emu"}],
                  "scoring": {"scorers": [{"type": "prefix-precise", "weight": 3},
                                          {"type": "running-requests"}], **scoring}}},
    ]
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump_all(docs))
    return config


@contextlib.asynccontextmanager
async def replica(config: Path, model_dir: Path, sync_url: str | None,
                  scrape_interval_s: float = 0.05) -> AsyncIterator[tuple[Router, str]]:
    async with running(RouterSettings(config_paths=[config], host="127.0.0.1", http_port=0,
                                      ext_proc_port=None, grpc_port=None, metrics_port=None,
                                      scrape_interval_s=scrape_interval_s,
                                      config_poll_interval_s=0.05, budgets=False,
                                      tokenizer_dirs={MODEL: model_dir},
                                      replica_sync_redis_url=sync_url)) as started:
        yield started


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{what} within {timeout_s} s")
        await asyncio.sleep(0.02)


def trusted(router: Router) -> bool:
    feeds = router.kv_event_feeds
    assert feeds is not None
    return all(status.get("trustworthy") and len(pool) == ENGINES
               for pool in feeds.statuses().values() for status in pool)


def sample(router: Router, name: str, **labels: str) -> float:
    return sum(s.value for metric in router.metrics.registry.collect() for s in metric.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def busy(router: Router) -> dict[str, int]:
    return {ep.name: ep.in_flight for ep in router.datastore.endpoints() if ep.in_flight}


async def dispatched(router: Router, count: int) -> None:
    await eventually(lambda: sum(busy(router).values()) == count, f"{count} dispatched")


async def applied(router: Router, count: int) -> None:
    await eventually(lambda: sample(router, "kvroute_replica_sync_received_records_total",
                                    result="applied") >= count,
                     f"{count} records of the other replica applied")


@contextlib.asynccontextmanager
async def two_replicas(config: Path, model_dir: Path, redis_url: str
                       ) -> AsyncIterator[tuple[Router, str, Router, str]]:
    """Replicas A and B sharing ``redis_url``, once both trust every engine's KV events and B
    is subscribed to the channel."""
    async with replica(config, model_dir, redis_url) as (a, url_a), \
            replica(config, model_dir, redis_url) as (b, url_b):
        await eventually(lambda: trusted(a) and trusted(b), "both replicas trust every engine")
        await eventually(lambda: sample(b, "kvroute_replica_sync_connected") == 1,
                         "replica B subscribed")
        yield a, url_a, b, url_b


def pending_blocks(router: Router, endpoint: str) -> int:
    feeds = router.kv_event_feeds
    assert feeds is not None
    return sum(pool.index.pending_count(endpoint) for pool in feeds._pools.values())


async def stall_all(fleet: EmulatedFleet, action: str) -> None:
    async with aiohttp.ClientSession() as s:
        for index in range(ENGINES):
            async with s.post(f"http://127.0.0.1:{fleet.admin_port}/engines/{index}/{action}",
                              json={}) as resp:
                assert resp.status == 200, await resp.text()


def context(k: int) -> str:
    """A tenant's long shared context (many blocks)."""
    return f"tenant {k} context: " + " ".join(f"fact{k}x{j}" for j in range(120))


async def complete(session: aiohttp.ClientSession, url: str, prompt: str) -> str:
    body = {"model": "chat", "prompt": prompt, "max_tokens": 2}
    async with asyncio.timeout(60), session.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["x-kvroute-endpoint"]


async def test_a_replica_sends_a_tenant_to_the_engine_another_replica_just_chose(
        tmp_path: Path, fleet: EmulatedFleet, model_dir: Path, redis_url: str) -> None:
    config = _config(tmp_path, fleet)
    async with two_replicas(config, model_dir, redis_url) as (a, url_a, b, url_b), \
            aiohttp.ClientSession() as s:
        await stall_all(fleet, "stall")
        tasks: list[asyncio.Task[str]] = []
        chosen: list[str] = []
        try:
            for k in range(3):
                before = busy(a)
                tasks.append(asyncio.create_task(complete(s, url_a, context(k) + " question A")))
                await dispatched(a, k + 1)
                (engine,) = {e for e, n in busy(a).items() if n > before.get(e, 0)}
                chosen.append(engine)
                await applied(b, k + 1)
                assert pending_blocks(b, engine) > 0
                before_b = busy(b)
                tasks.append(asyncio.create_task(complete(s, url_b, context(k) + " question B")))
                await dispatched(b, k + 1)
                (engine_b,) = {e for e, n in busy(b).items() if n > before_b.get(e, 0)}
                assert engine_b == engine, f"tenant {k}: A chose {engine}, B chose {engine_b}"
            assert len(set(chosen)) == 3  # the load scorer spread A's three tenants
        finally:
            await stall_all(fleet, "resume")
            served = await asyncio.gather(*tasks)
        assert served[0::2] == served[1::2]
        assert sample(a, "kvroute_replica_sync_sent_records_total", result="published") >= 3
        assert sample(b, "kvroute_replica_sync_rejected_messages_total") == 0


def queued_priorities(fleet: EmulatedFleet, engine: str) -> list[int]:
    """The vLLM priorities of the requests waiting in the (stalled) engine named ``engine``, in
    its queue's order."""
    (slot,) = [slot for slot, e in zip(fleet.slots, fleet.endpoints(), strict=True)
               if e["name"] == engine]
    return [request.priority for request in slot.engine.sim.waiting]


async def test_on_priority_engines_a_follower_through_another_replica_queues_after_its_leader(
        tmp_path: Path, model_dir: Path, redis_url: str) -> None:
    """Replica A sends a tenant's first request, which computes the long context; replica B
    sends the tenant's next one to the same engine (the pending marks). B's request holds the
    context only as pending, so its own priority (arrival + one block's penalty) is far below
    A's (arrival + the whole context's): queued first, it would compute the context itself.
    With A's in-flight prefix shared, B ranks it one after A's; when A's request answers, B
    forgets the prefix (the answered record)."""
    async with emulated_fleet(model_dir, ENGINES, scheduling_policy="priority") as fleet:
        config = _config(tmp_path, fleet, prefillWaitMs=0, prefillPriorityMsPerToken=10)
        async with two_replicas(config, model_dir, redis_url) as (a, url_a, b, url_b), \
                aiohttp.ClientSession() as s:
            await stall_all(fleet, "stall")
            try:
                leader = asyncio.create_task(complete(s, url_a, context(3) + " question A"))
                await dispatched(a, 1)
                (engine,) = busy(a)
                await eventually(lambda: len(queued_priorities(fleet, engine)) == 1,
                                 "A's request queued at the engine")
                (first,) = queued_priorities(fleet, engine)
                await applied(b, 1)
                assert sample(b, "kvroute_replica_sync_remote_prefills") == 1
                follower = asyncio.create_task(complete(s, url_b, context(3) + " question B"))
                await dispatched(b, 1)
                assert busy(b) == {engine: 1}
                await eventually(lambda: len(queued_priorities(fleet, engine)) == 2,
                                 "both requests queued at the engine")
                # waiting in queue order: without the shared prefix, B's request comes first
                assert queued_priorities(fleet, engine) == [first, first + 1]
            finally:
                await stall_all(fleet, "resume")
            assert await leader == await follower  # the same engine served both
            await eventually(lambda: sample(b, "kvroute_replica_sync_remote_prefills") == 0,
                             "B forgot A's prefix once it answered")
            assert all(not ep.prefill_in_flight for ep in b.datastore.endpoints())


def backlogs(router: Router) -> dict[str, float]:
    return {ep.name: ep.prefill_backlog for ep in router.datastore.endpoints()
            if ep.prefill_backlog}


async def test_a_dispatch_counts_in_the_other_replicas_prefill_backlog_until_it_answers(
        tmp_path: Path, fleet: EmulatedFleet, model_dir: Path, redis_url: str) -> None:
    """A's request leaves its engine a long context to compute: B counts those tokens in that
    engine's prefill backlog too, so B's ``prefill-cost`` scorer sends another tenant elsewhere,
    until A's request answers (its answered record). Without it B sees an idle fleet."""
    config = _config(tmp_path, fleet, scorers=[{"type": "prefix-precise", "weight": 1},
                                               {"type": "prefill-cost", "weight": 3}])
    async with two_replicas(config, model_dir, redis_url) as (a, url_a, b, url_b), \
            aiohttp.ClientSession() as s:
        await stall_all(fleet, "stall")
        tasks: list[asyncio.Task[str]] = []
        try:
            tasks.append(asyncio.create_task(complete(s, url_a, context(8))))
            await dispatched(a, 1)
            (engine,) = busy(a)
            (tokens,) = backlogs(a).values()
            assert list(backlogs(a)) == [engine] and tokens > 100
            await eventually(lambda: backlogs(b) == {engine: math.ceil(tokens)},
                             "B counts A's dispatch in the engine's backlog")
            assert sample(b, "kvroute_replica_sync_remote_backlog_tokens") == math.ceil(tokens)
            assert sample(b, "kvroute_replica_sync_replicas") == 2  # B heard from A
            tasks.append(asyncio.create_task(complete(s, url_b, context(9))))
            await dispatched(b, 1)
            assert engine not in busy(b)
        finally:
            await stall_all(fleet, "resume")
            await asyncio.gather(*tasks)
        await eventually(lambda: not backlogs(a) and not backlogs(b),
                         "both backlogs empty once both requests answered")
        assert sample(b, "kvroute_replica_sync_remote_backlog_tokens") == 0


async def test_a_follower_through_another_replica_waits_for_its_leaders_prefix(
        tmp_path: Path, fleet: EmulatedFleet, model_dir: Path, redis_url: str) -> None:
    """``prefillWaitMs`` across replicas (FCFS engines): B's request for a context A's request
    is computing waits at B until A's answer starts — A's answered record ends the wait — and
    then reads the context from the engine's cache instead of computing it beside A's."""
    config = _config(tmp_path, fleet, prefillWaitMs=60000)
    async with two_replicas(config, model_dir, redis_url) as (a, url_a, b, url_b), \
            aiohttp.ClientSession() as s:
        await stall_all(fleet, "stall")
        try:
            leader = asyncio.create_task(complete(s, url_a, context(5) + " question A"))
            await dispatched(a, 1)
            await applied(b, 1)
            follower = asyncio.create_task(complete(s, url_b, context(5) + " question B"))
            await dispatched(b, 1)
            assert busy(b) == busy(a)
        finally:
            await stall_all(fleet, "resume")
        assert await leader == await follower
        assert sample(b, "kvroute_prefill_waits_total", outcome="answered") == 1
        assert sample(b, "kvroute_prefill_waits_total", outcome="timeout") == 0
        await eventually(lambda: sample(b, "kvroute_replica_sync_remote_prefills") == 0,
                         "B forgot A's prefix")


async def test_another_replicas_prefix_is_forgotten_when_its_pending_marks_expire(
        tmp_path: Path, fleet: EmulatedFleet, model_dir: Path, redis_url: str) -> None:
    """A's request never answers while the engines are stalled (or A's answered record is
    lost): B keeps A's in-flight prefix only as long as the pending marks
    (``engine.kvEvents.pendingMs``), so nothing waits for it or queues behind it after that."""
    config = _config(tmp_path, fleet, pending_ms=300, prefillWaitMs=60000)
    async with two_replicas(config, model_dir, redis_url) as (a, url_a, b, _b), \
            aiohttp.ClientSession() as s:
        await stall_all(fleet, "stall")
        try:
            leader = asyncio.create_task(complete(s, url_a, context(6)))
            await dispatched(a, 1)
            await eventually(lambda: any(ep.prefill_in_flight for ep in b.datastore.endpoints()),
                             "B registered A's prefix")
            await eventually(lambda: sample(b, "kvroute_replica_sync_remote_prefills") == 0,
                             "B forgot A's prefix at the pending marks' expiry")
            assert all(not ep.prefill_in_flight for ep in b.datastore.endpoints())
        finally:
            await stall_all(fleet, "resume")
        await leader


async def test_a_dispatch_counts_as_load_on_the_other_replica_until_its_next_scrape(
        tmp_path: Path, fleet: EmulatedFleet, model_dir: Path, redis_url: str) -> None:
    config = _config(tmp_path, fleet)
    # A scrape every minute: the first one happens at start, the next not during the test.
    async with replica(config, model_dir, redis_url, 60.0) as (_, url_a), \
            replica(config, model_dir, redis_url, 60.0) as (b, _b), aiohttp.ClientSession() as s:
        await eventually(lambda: all(ep.metrics is not None for ep in b.datastore.endpoints()),
                         "B scraped every engine")
        await eventually(lambda: sample(b, "kvroute_replica_sync_connected") == 1,
                         "replica B subscribed")
        served = await complete(s, url_a, context(7))
        await eventually(lambda: sample(b, "kvroute_replica_sync_received_records_total",
                                        result="applied") >= 1, "B applied A's dispatch")
        counts = {ep.address: ep.dispatched_since_scrape for ep in b.datastore.endpoints()}
        assert counts == {address: int(address == served) for address in counts}


def first_bytes(router: Router) -> dict[str, int]:
    return {ep.address: ep.answers_started for ep in router.datastore.endpoints()
            if ep.answers_started}


async def test_a_first_byte_through_one_replica_counts_as_its_engine_answering_on_the_other(
        tmp_path: Path, fleet: EmulatedFleet, model_dir: Path, redis_url: str) -> None:
    """The proxy's per-try timeout gives a stream up only when its engine started answering
    nothing else in the period (``Endpoint.answers_started``). An engine answering only the
    other replica's requests is busy too: B's first bytes move A's count of that engine, and
    A's move B's. Without the *started* record A never sees B's engine answer."""
    config = _config(tmp_path, fleet)
    async with two_replicas(config, model_dir, redis_url) as (a, url_a, b, url_b), \
            aiohttp.ClientSession() as s:
        through_b = await complete(s, url_b, context(3))
        assert first_bytes(b) == {through_b: 1}
        await eventually(lambda: first_bytes(a) == {through_b: 1},
                         "A counts B's first byte on B's engine")
        through_a = await complete(s, url_a, context(4))
        expected = {through_b: 1}
        expected[through_a] = expected.get(through_a, 0) + 1
        assert first_bytes(a) == expected
        await eventually(lambda: first_bytes(b) == expected, "B counts A's first byte")


async def test_hostile_or_foreign_records_are_counted_and_change_nothing(
        tmp_path: Path, fleet: EmulatedFleet, model_dir: Path, redis_url: str) -> None:
    import redis.asyncio

    config = _config(tmp_path, fleet)
    async with replica(config, model_dir, redis_url) as (b, url_b), aiohttp.ClientSession() as s:
        assert b.replica_sync is not None
        await eventually(lambda: trusted(b), "B trusts every engine")
        await eventually(lambda: sample(b, "kvroute_replica_sync_connected") == 1,
                         "replica B subscribed")
        name = b.datastore.endpoints()[0].name
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            channel = b.replica_sync.channel
            await client.publish(channel, b"garbage")
            await client.publish(channel, encode(b"\x01" * 16, [
                DispatchRecord("default/other-pool", name, (1, 2, 3)),
                DispatchRecord("default/emu", "no-such-engine", (1, 2, 3))]))
        finally:
            await client.aclose()
        await eventually(lambda: sample(b, "kvroute_replica_sync_received_records_total") >= 2,
                         "B read the records")
        assert sample(b, "kvroute_replica_sync_rejected_messages_total") == 1
        assert sample(b, "kvroute_replica_sync_received_records_total",
                      result="unknown_pool") == 1
        assert sample(b, "kvroute_replica_sync_received_records_total",
                      result="unknown_endpoint") == 1
        assert all(pending_blocks(b, ep.name) == 0 for ep in b.datastore.endpoints())
        await complete(s, url_b, context(9))  # still serving


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_without_redis_the_replica_routes_alone_and_says_so(
        tmp_path: Path, fleet: EmulatedFleet, model_dir: Path) -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    async with replica(_config(tmp_path, fleet), model_dir, url) as (b, url_b), \
            aiohttp.ClientSession() as s:
        for k in range(3):
            await complete(s, url_b, context(20 + k))
        await eventually(lambda: sample(b, "kvroute_replica_sync_sent_records_total",
                                        result="failed") >= 1, "the failed publish counted")
        assert sample(b, "kvroute_replica_sync_connected") == 0
        assert sum(ep.in_flight for ep in b.datastore.endpoints()) == 0




async def test_a_replicas_waiters_reach_the_other_over_redis(redis_url: str) -> None:
    """The waiting report over a real Redis: B learns which requests wait in A's admission
    queue (its own queue then lets go only its own among the fleet's oldest), and that nothing
    waits there any more once A's queue empties."""
    from kvroute_router.datastore.store import Datastore
    from kvroute_router.framework.registry import SharedServices
    from kvroute_router.replicasync.sync import ReplicaSync
    from prometheus_client import CollectorRegistry

    a, b = (ReplicaSync.from_url(redis_url, Datastore(), SharedServices(), CollectorRegistry())
            for _ in range(2))
    queue = {"default/chat": [(0, 1_700_000_000_000), (0, 1_700_000_000_005)]}
    a.waiting = lambda limit: {k: v[:limit] for k, v in queue.items() if v}
    await a.start()
    await b.start()
    try:
        await eventually(lambda: b.metrics.connected._value.get() == 1, "B subscribed")
        a.on_waiting_changed()
        await eventually(lambda: b.peers_waiting("default/chat") == queue["default/chat"],
                         "B knows A's waiters")
        queue["default/chat"] = []
        a.on_waiting_changed()
        await eventually(lambda: b.peers_waiting("default/chat") == [], "A's queue emptied")
        assert b.replicas() == 2
    finally:
        await a.stop()
        await b.stop()
