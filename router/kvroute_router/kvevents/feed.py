"""Wires the KV-event index into a running router: registers the ``prefix-precise`` scorer
(:mod:`kvroute_router.plugins.prefix_precise`) over each pool's ``PoolKVEvents``, keeps one
``PoolKVEvents`` per pool that some policy scores precisely subscribed to exactly the pool's
current engines (a pool no policy scores with ``prefix-precise`` is not followed: see
:meth:`KVEventFeeds.followed_pools`), and exports their metrics through the router's registry.

Sources: static endpoints with ``kvEventsEndpoint`` (embedded mode), and in Kubernetes mode each
ready pod's IP with the pool's ``engine.kvEvents`` ports. The ``PoolKVEvents`` live in the
router's shared services under ``kvevents/<pool key>``, where the scorer's factory finds them.
A tokenizer folder per served model name (``--tokenizer-dir MODEL=DIR``) lets the scorer hash
prompts exactly as the engine does; without one it scores by the approximate history.
If the KV-event machinery cannot be imported (an optional dependency missing), precise scoring
degrades to ``prefix-approx`` (the fallback ``register_builtin_plugins`` declares) and this feed
does nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kvroute_api.route_policy import ScoringSpec
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from kvroute_router.datastore.store import Datastore, PoolState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.profile import ProfileBuildError, plan_scorers
from kvroute_router.framework.registry import PluginContext, PluginRegistry, SharedServices
from kvroute_router.framework.tasks import cancel_and_wait
from kvroute_router.plugins.prefix_approx import ApproxPrefixScorer
from kvroute_router.plugins.prefix_precise import PrecisePrefixScorer

log = logging.getLogger(__name__)


def services_key(pool_key: str) -> str:
    """Where a pool's ``PoolKVEvents`` lives in the shared services."""
    return f"kvevents/{pool_key}"


def build_precise_prefix(context: PluginContext) -> PrecisePrefixScorer:
    """The ``prefix-precise`` factory: the scorer over the pool's ``PoolKVEvents`` (an index
    nobody feeds when the router runs no feed for the pool: every endpoint then falls back to
    the approximate history)."""
    from kvroute_router.kvevents.hashing import BlockHashConfig
    from kvroute_router.kvevents.hub import PoolKVEvents

    pool = context.pool
    pool_events = context.services.get_or_create(
        services_key(context.pool_key), PoolKVEvents,
        lambda: (PoolKVEvents.for_pool(pool) if pool
                 else PoolKVEvents(BlockHashConfig(block_size=16))))
    return PrecisePrefixScorer(pool_events, ApproxPrefixScorer.build(context))


def register_precise_prefix(registry: PluginRegistry) -> bool:
    """Register ``prefix-precise`` if the KV-event machinery is usable; returns whether it was."""
    try:
        import kvroute_router.kvevents.hub  # noqa: F401  (zmq, tokenizers)
    except Exception as exc:  # a missing optional dependency must not stop the router
        log.warning("prefix-precise unavailable (%s); policies fall back to prefix-approx", exc)
        return False
    registry.register(PrecisePrefixScorer.TYPE, "scorer", build_precise_prefix,
                      prefix_match=True)
    return True


class KVEventFeeds:
    """One KV-event subscription set per pool, following the datastore."""

    def __init__(self, datastore: Datastore, services: SharedServices,
                 registry: PluginRegistry,
                 tokenizer_dirs: Mapping[str, Path] | None = None) -> None:
        self.datastore = datastore
        self.services = services
        self.registry = registry
        self.tokenizer_dirs = dict(tokenizer_dirs or {})
        self._pools: dict[str, Any] = {}
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()
        """Set once a sync of the loaded datastore is over (its pools' tokenizers and
        subscribers built); a sync that ran before the first listing (Kubernetes) does not
        count."""

    async def start(self) -> None:
        self.datastore.add_listener(self._on_change)
        self.datastore.add_pool_listener(lambda _key: self._dirty.set())  # spec edits apply
        self.datastore.add_policy_listener(self._dirty.set)  # which pools are scored precisely
        self._dirty.set()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kv-event-feeds")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task], what="kv-event feeds")
        pools = list(self._pools.values())
        self._pools.clear()
        results = await asyncio.gather(*(events.aclose() for events in pools),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("closing a pool's KV-event subscriptions failed: %r", result)

    def metric_registries(self) -> list[CollectorRegistry]:
        """Each pool's KV-event metrics registry (one per ``PoolKVEvents``)."""
        return [events.metrics.registry for events in list(self._pools.values())]

    def sizes(self) -> dict[str, int]:
        """Every pool's ``PoolKVEvents.sizes``, summed."""
        out: dict[str, int] = {}
        for events in list(self._pools.values()):
            for key, value in events.sizes().items():
                out[key] = out.get(key, 0) + value
        return out

    def statuses(self) -> dict[str, list[dict[str, Any]]]:
        """Per pool key, each engine's subscription status (connected, synced, trustworthy)."""
        return {key: events.statuses() for key, events in self._pools.items()}

    def _on_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        self._dirty.set()

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            loaded = self.datastore.loaded
            try:
                await self.sync()
            except Exception:
                log.exception("updating KV-event subscriptions failed")
            finally:
                if loaded:
                    self.synced.set()

    def followed_pools(self) -> set[str]:
        """Keys of the pools some policy scores with ``prefix-precise`` (a policy targeting the
        pool, or the implied default policy of a pool reachable by its served name). Following
        a pool costs every replica CPU for every block any of its engines stores or evicts; a
        pool routed only by other scorers is not followed."""
        return {key for key, scorings in self.datastore.scoring_by_pool().items()
                if any(self._runs_precise(scoring) for scoring in scorings)}

    def _runs_precise(self, scoring: ScoringSpec) -> bool:
        try:
            return plan_scorers(self.registry, scoring).runs(PrecisePrefixScorer.TYPE)
        except ProfileBuildError:  # no profile can be built from it: nothing would read the index
            return False

    async def sync(self) -> None:
        from kvroute_router.kvevents.hub import (
            eviction_forecast_for_pool,
            pending_ttl_for_pool,
            pod_source,
        )
        from kvroute_router.kvevents.subscriber import KVEventSource

        current = {state.key: state for state in self.datastore.pools()}
        followed = self.followed_pools()
        for key in [k for k in self._pools if k not in current]:
            await self._pools.pop(key).aclose()
            self.services.drop_prefix(services_key(key))
        for key, state in current.items():
            events = self._pools.get(key)
            if key not in followed:
                if events is not None:
                    await events.set_sources([])  # stops its subscribers, drops their blocks
                continue
            if events is None:
                events = self._pools[key] = self._events_for(state)
            events.index.pending_ttl = pending_ttl_for_pool(state.pool)  # an edit applies
            events.index.forecast_evictions = eviction_forecast_for_pool(state.pool)
            sources = []
            kv_spec = state.pool.spec.engine.kv_events
            for ep in state.endpoints.values():
                if ep.kv_events_endpoint:
                    sources.append(KVEventSource(endpoint=ep.name,
                                                 events_endpoint=ep.kv_events_endpoint,
                                                 replay_endpoint=ep.kv_events_replay_endpoint))
                elif not state.pool.spec.endpoints and kv_spec.enabled:
                    host = ep.address.rsplit(":", 1)[0].strip("[]")
                    sources.append(pod_source(ep.name, host, state.pool))
            await events.set_sources(sources)

    def _events_for(self, state: PoolState) -> Any:
        """The pool's ``PoolKVEvents``: the one the ``prefix-precise`` factory already made
        (a request built the pool's profile before this sync ran, and that profile stays
        cached until the datastore's next change: it must read the index fed here), else a
        new one, shared through the services."""
        from kvroute_router.kvevents.hub import PoolKVEvents

        events = self.services.get(services_key(state.key), PoolKVEvents)
        if events is None:
            events = PoolKVEvents.for_pool(state.pool, tokenizer=self._tokenizer_for(state))
            self.services.put(services_key(state.key), events)
        elif events.tokenizer is None:
            events.tokenizer = self._tokenizer_for(state)
        return events

    def _tokenizer_for(self, state: PoolState) -> Any:
        from kvroute_router.kvevents.tokenization import PromptTokenizer

        directory = self.tokenizer_dirs.get(state.model_name)
        if directory is None:
            return None
        try:
            return PromptTokenizer.from_directory(directory)
        except Exception as exc:
            log.warning("pool %s: tokenizer in %s unusable (%s); precise prefix scoring "
                        "will use the approximate history", state.key, directory, exc)
            return None


class KVEventMetricsCollector:
    """Re-exports the metrics of every pool's KV-event index (one registry each) through the
    router's registry, merging same-named families, so ``/metrics`` carries them."""

    def __init__(self, feeds: KVEventFeeds) -> None:
        self.feeds = feeds

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for registry in self.feeds.metric_registries():
            for family in registry.collect():
                into = merged.get(family.name)
                if into is None:
                    into = Metric(family.name, family.documentation, family.type, family.unit)
                    merged[family.name] = into
                into.samples.extend(family.samples)
        yield from merged.values()
