"""Backends: the per-replica memory store and the Redis store (a real redis-server) —
exact and semantic lookups, TTL, maxEntries eviction, sharing between replicas, restarts,
and the in-memory vector index following Redis."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from kvroute_router.responsecache.redis_store import RedisStore
from kvroute_router.responsecache.store import Entry, MemoryStore


def unit(*values: float) -> Any:
    v = np.zeros(8, dtype=np.float32)
    v[:len(values)] = values
    return v / np.linalg.norm(v)


def entry(i: str, vector: Any, clock: Any, ttl: float = 60.0, part: str = "p") -> Entry:
    return Entry(id=i, partition=part, vector=vector, answer=f"answer-{i}".encode(),
                 expires_at=clock() + ttl)


def redis_store(url: str, clock: Any, max_entries: int = 100) -> RedisStore:
    return RedisStore(aioredis.Redis.from_url(url), "test:rc:t:", max_entries, clock=clock)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_exact_semantic_ttl_and_eviction(backend: str, clock: Any, request: Any) -> None:
    if backend == "memory":
        store: Any = MemoryStore(max_entries=2, clock=clock)
    else:
        store = redis_store(request.getfixturevalue("redis_url"), clock, max_entries=2)
    try:
        await store.put(entry("a", unit(1, 0), clock, ttl=10))
        assert await store.get_exact("a") == b"answer-a"
        assert await store.get_exact("b") is None
        near = unit(1, 0.2)  # cosine 0.98
        assert await store.search("p", near, 0.95) == (b"answer-a",
                                                       pytest.approx(0.98, abs=0.01))
        assert await store.search("p", near, 0.99) is None
        assert await store.search("other-partition", near, 0.5) is None

        await store.put(entry("b", unit(0, 1), clock, ttl=100))
        clock.now += 1
        await store.get_exact("a")  # a is now the most recently used
        evicted = await store.put(entry("c", unit(1, 1), clock, ttl=100))
        assert evicted == 1 and await store.entries() == 2
        assert await store.get_exact("b") is None and await store.get_exact("a") == b"answer-a"
        assert await store.search("p", unit(0, 1), 0.99) is None  # b's vector left the index

        clock.now += 10  # a expired
        assert await store.get_exact("c") == b"answer-c"
        assert await store.search("p", unit(1, 0), 0.99) is None
        if backend == "memory":
            assert await store.get_exact("a") is None
    finally:
        await store.close()


async def test_redis_is_shared_by_replicas_and_survives_restarts(redis_url: str,
                                                                 clock: Any) -> None:
    one, two = redis_store(redis_url, clock), redis_store(redis_url, clock)
    try:
        await two.sync()  # two built its index before one wrote
        await one.put(entry("a", unit(1, 0), clock))
        assert await two.get_exact("a") == b"answer-a"
        assert await two.search("p", unit(1, 0.1), 0.9) is not None  # followed the log
    finally:
        await one.close()
        await two.close()
    restarted = redis_store(redis_url, clock)
    try:
        found = await restarted.search("p", unit(1, 0.1), 0.9)
        assert found is not None and found[0] == b"answer-a"
    finally:
        await restarted.close()


async def test_redis_index_never_serves_what_redis_lost(redis_url: str, clock: Any) -> None:
    store = redis_store(redis_url, clock)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await store.put(entry("a", unit(1, 0), clock))
        assert await store.search("p", unit(1, 0), 0.9) is not None
        await admin.flushdb()  # e.g. an operator flushed Redis, or it restarted empty
        assert await store.search("p", unit(1, 0), 0.9) is None
        assert len(store.index) == 0
        await store.put(entry("b", unit(0, 1), clock))
        assert await store.search("p", unit(0, 1), 0.9) is not None
        await admin.delete("test:rc:t:e:b")  # gone without a log event
        assert await store.search("p", unit(0, 1), 0.9) is None
    finally:
        await store.close()
        await admin.aclose()


async def test_redis_log_trimmed_past_a_replica_rebuilds_its_index(redis_url: str, clock: Any,
                                                                   monkeypatch: Any) -> None:
    from kvroute_router.responsecache import redis_store as module

    monkeypatch.setattr(module, "LOG_MAXLEN", 3)
    writer, reader = redis_store(redis_url, clock), redis_store(redis_url, clock)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await reader.sync()
        for i in range(12):
            await writer.put(entry(f"e{i}", unit(1, i), clock))
        await admin.xtrim("test:rc:t:log", maxlen=2)  # exact trim: events were lost
        await reader.sync()
        assert len(reader.index) == 12
    finally:
        await writer.close()
        await reader.close()
        await admin.aclose()
