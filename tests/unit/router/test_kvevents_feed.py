"""The router registers prefix-precise and keeps one KV-event subscription set per pool that
follows the datastore's endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from kvroute_api.inference_pool import InferencePool
from kvroute_router.app import Router, RouterSettings
from kvroute_router.datastore.store import Datastore
from kvroute_router.framework.profile import build_profile
from kvroute_router.framework.registry import PluginContext, PluginRegistry, SharedServices
from kvroute_router.kvevents.feed import KVEventFeeds
from kvroute_router.kvevents.hub import PoolKVEvents

from tests.unit.router.router_fixtures import make_policy


def _router_registry() -> PluginRegistry:
    return Router(RouterSettings(http_port=None, ext_proc_port=None, grpc_port=None,
                                 metrics_port=None)).registry


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
    feeds = KVEventFeeds(store, services, _router_registry())
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


def _with_kv_events(pool: InferencePool, **update: Any) -> InferencePool:
    """The pool with these ``engine.kvEvents`` fields changed."""
    spec = pool.spec.model_copy(update={"engine": pool.spec.engine.model_copy(update={
        "kv_events": pool.spec.engine.kv_events.model_copy(update=update)})})
    return pool.model_copy(update={"spec": spec})


def _with_pending_ms(pool: InferencePool, pending_ms: int) -> InferencePool:
    return _with_kv_events(pool, pending_ms=pending_ms)


async def _feed_events(services: SharedServices) -> PoolKVEvents | None:
    """The pool's ``PoolKVEvents`` once the started feed has made it."""
    await _until(lambda: services.get("kvevents/default/local", PoolKVEvents) is not None)
    return services.get("kvevents/default/local", PoolKVEvents)


async def test_the_pools_pending_window_reaches_the_index_and_an_edit_applies() -> None:
    """``engine.kvEvents.pendingMs`` is how long a dispatched request's blocks count as held;
    an edit of the pool alone (same endpoints) reaches the running index."""
    store = Datastore()
    services = SharedServices()
    store.replace([_with_pending_ms(pool_with_events(1), 2000)], [make_policy()])
    feeds = KVEventFeeds(store, services, _router_registry())
    await feeds.start()
    try:
        events = await _feed_events(services)
        assert events is not None and events.index.pending_ttl == 2.0
        store.set_pool(_with_pending_ms(pool_with_events(1), 40_000))
        await _until(lambda: events.index.pending_ttl == 40.0)
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
    feeds = KVEventFeeds(store, SharedServices(), _router_registry())
    await feeds.start()
    try:
        await asyncio.sleep(0.1)  # the first sync ran, on an empty store
        assert not feeds.synced.is_set()
        store.replace([pool_with_events(1)], [make_policy()])  # the listing: loaded, dirty
        async with asyncio.timeout(10):
            await feeds.synced.wait()
    finally:
        await feeds.stop()


async def test_a_scorer_built_before_the_first_sync_reads_the_index_the_feed_fills() -> None:
    """A request can build the pool's profile between the pool's arrival and the feed's sync
    (the scorer's factory then creates the pool's ``PoolKVEvents``). The profile stays cached
    until the next datastore change, so the feed must fill that object, not replace it."""
    store = Datastore()
    services = SharedServices()
    store.replace([pool_with_events(2)], [make_policy()])
    context = PluginContext(scoring=make_policy().spec.scoring, pool_key="default/local",
                            pool=store.pool("default/local").pool,  # type: ignore[union-attr]
                            services=services)
    profile = build_profile(_router_registry(), context, "t")
    early: PoolKVEvents = profile.scorers[0].scorer.pool_events  # type: ignore[attr-defined]
    feeds = KVEventFeeds(store, services, _router_registry())
    try:
        await feeds.sync()
        assert services.get("kvevents/default/local", PoolKVEvents) is early
        assert {s["endpoint"] for s in early.statuses()} == {"e0", "e1"}
    finally:
        await feeds.stop()


def _followed(services: SharedServices, key: str = "kvevents/default/local") -> set[str]:
    events = services.get(key, PoolKVEvents)
    return set() if events is None else {s["endpoint"] for s in events.statuses()}


async def _until(check: Callable[[], bool]) -> None:
    for _ in range(1000):  # 10 s at most
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the feed did not follow the edit within 10 s")


async def test_only_pools_some_policy_scores_precisely_are_followed() -> None:
    """Following a pool's KV events costs every replica CPU for every block any engine stores
    or evicts; a pool whose every policy routes without ``prefix-precise`` (or runs it at
    weight 0 with nothing reading its match: the profile skips it) is not followed, and an
    edit of the policy starts or stops following it."""
    queue_only: dict[str, Any] = {"scorers": [{"type": "queue-depth", "weight": 1}]}
    unread: dict[str, Any] = {"scorers": [{"type": "prefix-precise", "weight": 0},
                                          {"type": "queue-depth", "weight": 1}]}
    store = Datastore()
    services = SharedServices()
    store.replace([pool_with_events(2)], [make_policy(scoring=queue_only)])
    feeds = KVEventFeeds(store, services, _router_registry())
    await feeds.start()
    try:
        async with asyncio.timeout(10):
            await feeds.synced.wait()
        assert _followed(services) == set()
        store.set_policy(make_policy(scoring=unread))
        await asyncio.sleep(0.1)
        assert _followed(services) == set()
        store.set_policy(make_policy())  # the default scoring: prefill-cost reads the match
        await _until(lambda: _followed(services) == {"e0", "e1"})
        store.set_policy(make_policy(scoring=queue_only))
        await _until(lambda: _followed(services) == set())
        # A second policy over the pool that scores precisely is enough.
        store.set_policy(make_policy(name="other", model="other"))
        await _until(lambda: _followed(services) == {"e0", "e1"})
        store.delete_policy("default/other")
        await _until(lambda: _followed(services) == set())
        # No policy targets the pool: its served name reaches it with the default scoring.
        store.delete_policy("default/chat")
        await _until(lambda: _followed(services) == {"e0", "e1"})
    finally:
        await feeds.stop()


async def test_a_policy_no_profile_can_be_built_from_does_not_stop_the_other_pools() -> None:
    """A registry in which a policy's scorer type is another kind of plugin (a replaced
    built-in) fails that policy's profile; the feed still follows the pools other policies
    score precisely, rather than failing its whole sync."""
    from kvroute_router.plugins.load_headroom import LoadHeadroomFilter

    registry = _router_registry()
    registry.register("queue-depth", "filter", LoadHeadroomFilter.build)
    other = pool_with_events(1).model_copy(update={"metadata": pool_with_events(1).metadata
                                                   .model_copy(update={"name": "other"})})
    store = Datastore()
    services = SharedServices()
    store.replace([pool_with_events(2), other], [
        make_policy(scoring={"scorers": [{"type": "queue-depth", "weight": 1},
                                         {"type": "prefix-precise", "weight": 1}]}),
        make_policy(name="b", model="b", pools=[{"name": "other"}])])
    feeds = KVEventFeeds(store, services, registry)
    try:
        await feeds.sync()
        assert _followed(services) == set()
        assert _followed(services, "kvevents/default/other") == {"e0"}
    finally:
        await feeds.stop()


def _with_forecast(pool: InferencePool, on: bool) -> InferencePool:
    return _with_kv_events(pool, eviction_forecast=on)


async def test_the_pools_eviction_forecast_reaches_the_index_and_an_edit_applies() -> None:
    """``engine.kvEvents.evictionForecast`` (on by default) reaches the index the feed feeds
    and the one a scorer builds without a feed; turning it off on the pool alone applies."""
    assert pool_with_events(1).spec.engine.kv_events.eviction_forecast
    store = Datastore()
    services = SharedServices()
    store.replace([pool_with_events(1)], [make_policy()])
    feeds = KVEventFeeds(store, services, _router_registry())
    await feeds.start()
    try:
        events = await _feed_events(services)
        assert events is not None and events.index.forecast_evictions
        store.set_pool(_with_forecast(pool_with_events(1), False))
        await _until(lambda: not events.index.forecast_evictions)
        assert not events.index.forecast_evictions
        context = PluginContext(scoring=make_policy().spec.scoring, pool_key="other/pool",
                                pool=_with_forecast(pool_with_events(1), False),
                                services=SharedServices())
        router = Router(RouterSettings(http_port=None, ext_proc_port=None, grpc_port=None,
                                       metrics_port=None))
        profile = build_profile(router.registry, context, "t")
        assert not profile.scorers[0].scorer.pool_events.index.forecast_evictions
    finally:
        await feeds.stop()
