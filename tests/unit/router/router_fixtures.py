"""Builders of pools, policies and directors for the router's unit tests."""

from __future__ import annotations

import random
import time
from typing import Any

from kvroute_api.inference_pool import InferencePool
from kvroute_api.route_policy import RoutePolicy
from kvroute_router.datastore.store import Datastore
from kvroute_router.director import Director
from kvroute_router.framework.endpoint import Endpoint, EndpointMetrics
from kvroute_router.framework.registry import PluginRegistry
from kvroute_router.kvevents.feed import register_precise_prefix, services_key
from kvroute_router.kvevents.hashing import BlockHashConfig
from kvroute_router.kvevents.hub import PoolKVEvents
from kvroute_router.plugins import register_builtin_plugins


def make_pool(name: str = "local", model: str = "test-model", count: int = 2,
              base_port: int = 8100, **spec: Any) -> InferencePool:
    return InferencePool.model_validate({
        "apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": name},
        "spec": {"mode": "External", "model": {"name": model}, "resources": {"gpus": 0},
                 "engine": {"blockSize": 32},
                 "endpoints": [{"name": f"{name}-{i}", "address": f"127.0.0.1:{base_port + i}"}
                               for i in range(count)], **spec},
    }, by_alias=True)


def make_policy(name: str = "chat", model: str = "chat", pools: list[dict[str, Any]] | None = None,
                **spec: Any) -> RoutePolicy:
    return RoutePolicy.model_validate({
        "apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
        "metadata": {"name": name},
        "spec": {"match": {"model": model}, "pools": pools or [{"name": "local"}], **spec},
    }, by_alias=True)


def make_director(pools: list[InferencePool], policies: list[RoutePolicy],
                  seed: int = 7) -> tuple[Director, Datastore]:
    store = Datastore()
    store.replace(pools, policies)
    registry = register_builtin_plugins(PluginRegistry())
    return Director(store, registry, rng=random.Random(seed)), store


def set_metrics(ep: Endpoint, **values: Any) -> None:
    ep.metrics = EndpointMetrics(scraped_at=time.monotonic(), **values)


class TrustedKVEvents(PoolKVEvents):
    """A pool's KV-event state with every endpoint's feed healthy (no ZMQ in these tests)."""

    def trustworthy(self, endpoint: str) -> bool:
        return True


def with_precise_prefix(director: Director, pool_key: str, block_size: int) -> Director:
    """``director`` with ``prefix-precise`` registered over a trusted, empty index of the pool
    (token-id prompts need no tokenizer)."""
    register_precise_prefix(director.registry)
    director.services.put(services_key(pool_key),
                          TrustedKVEvents(BlockHashConfig(block_size=block_size)))
    return director
