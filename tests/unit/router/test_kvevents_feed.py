"""The router registers prefix-precise and keeps one KV-event subscription set per pool that
follows the datastore's endpoints."""

from __future__ import annotations

import asyncio

from kvroute_api.inference_pool import InferencePool
from kvroute_router.app import Router, RouterSettings
from kvroute_router.datastore.store import Datastore
from kvroute_router.framework.profile import build_profile
from kvroute_router.framework.registry import PluginContext, SharedServices
from kvroute_router.kvevents.feed import KVEventFeeds
from kvroute_router.kvevents.hub import PoolKVEvents

from tests.unit.router.router_fixtures import make_policy


def pool_with_events(count: int) -> InferencePool:
    return InferencePool.model_validate({
        "kind": "InferencePool", "metadata": {"name": "local"},
        "spec": {"mode": "External", "model": {"name": "m"}, "resources": {"gpus": 0},
                 "endpoints": [{"name": f"e{i}", "address": f"127.0.0.1:{9100 + i}",
                                "kvEventsEndpoint": f"tcp://127.0.0.1:{9200 + i}"}
                               for i in range(count)]}}, by_alias=True)


async def test_feeds_follow_the_pool_and_the_scorer_finds_them() -> None:
    store = Datastore()
    services = SharedServices()
    store.replace([pool_with_events(2)], [make_policy()])
    feeds = KVEventFeeds(store, services)
    await feeds.sync()
    events = services.get("kvevents/default/local", PoolKVEvents)
    assert events is not None
    assert {s["endpoint"] for s in events.statuses()} == {"e0", "e1"}
    store.replace([pool_with_events(1)], [make_policy()])
    await feeds.sync()
    assert {s["endpoint"] for s in events.statuses()} == {"e0"}
    router = Router(RouterSettings(http_port=None, ext_proc_port=None, grpc_port=None,
                                   metrics_port=None))
    assert "prefix-precise" in router.registry
    context = PluginContext(scoring=make_policy().spec.scoring, pool_key="default/local",
                            pool=store.pool("default/local").pool,  # type: ignore[union-attr]
                            services=services)
    profile = build_profile(router.registry, context, "t")
    assert profile.scorers[0].type_name == "prefix-precise" and not profile.degraded
    assert profile.scorers[0].scorer.pool_events is events  # type: ignore[attr-defined]
    store.replace([], [])
    await feeds.sync()
    assert services.get("kvevents/default/local", PoolKVEvents) is None
    await feeds.stop()
    await asyncio.sleep(0)


def _with_pending_ms(pool: InferencePool, pending_ms: int) -> InferencePool:
    spec = pool.spec.model_copy(update={"engine": pool.spec.engine.model_copy(update={
        "kv_events": pool.spec.engine.kv_events.model_copy(update={"pending_ms": pending_ms})})})
    return pool.model_copy(update={"spec": spec})


async def test_the_pools_pending_window_reaches_the_index_and_an_edit_applies() -> None:
    """``engine.kvEvents.pendingMs`` is how long a dispatched request's blocks count as held;
    an edit of the pool alone (same endpoints) reaches the running index."""
    store = Datastore()
    services = SharedServices()
    store.replace([_with_pending_ms(pool_with_events(1), 2000)], [make_policy()])
    feeds = KVEventFeeds(store, services)
    await feeds.start()
    try:
        for _ in range(200):
            events = services.get("kvevents/default/local", PoolKVEvents)
            if events is not None:
                break
            await asyncio.sleep(0.01)
        assert events is not None and events.index.pending_ttl == 2.0
        store.set_pool(_with_pending_ms(pool_with_events(1), 40_000))
        for _ in range(200):
            if events.index.pending_ttl == 40.0:
                break
            await asyncio.sleep(0.01)
        assert events.index.pending_ttl == 40.0
        # The scorer built without a feed (no subscriptions) takes the pool's window too.
        context = PluginContext(scoring=make_policy().spec.scoring, pool_key="other/pool",
                                pool=_with_pending_ms(pool_with_events(1), 0),
                                services=SharedServices())
        router = Router(RouterSettings(http_port=None, ext_proc_port=None, grpc_port=None,
                                       metrics_port=None))
        profile = build_profile(router.registry, context, "t")
        assert profile.scorers[0].scorer.pool_events.index.pending_ttl == 0  # type: ignore[attr-defined]
    finally:
        await feeds.stop()


async def test_synced_waits_for_a_sync_of_the_loaded_store() -> None:
    """The start-up heap freeze waits on ``synced``: a sync that ran before the first listing
    (the Kubernetes source lists after start) has built no tokenizer yet and must not count."""
    store = Datastore()
    feeds = KVEventFeeds(store, SharedServices())
    await feeds.start()
    try:
        await asyncio.sleep(0.1)  # the first sync ran, on an empty store
        assert not feeds.synced.is_set()
        store.replace([pool_with_events(1)], [make_policy()])  # the listing: loaded, dirty
        async with asyncio.timeout(10):
            await feeds.synced.wait()
    finally:
        await feeds.stop()
