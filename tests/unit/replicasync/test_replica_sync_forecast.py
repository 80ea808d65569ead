"""Another replica's dispatch reaches this replica's eviction forecast as its own would: the
blocks it found held move to the recent end of this replica's index, and the blocks it leaves
the engine to compute forecast evictions with this replica's view of the engine's capacity.
Without both, each of three replicas saw a third of the fleet's touches and hid the contexts
the other two kept busy (docs/benchmarks/emulated-fleet.md, round 32)."""

from __future__ import annotations

from collections.abc import Sequence

from kvroute_router.datastore.store import Datastore
from kvroute_router.framework.endpoint import Endpoint, EndpointMetrics
from kvroute_router.framework.registry import SharedServices
from kvroute_router.kvevents.feed import services_key
from kvroute_router.kvevents.hashing import BlockHashConfig
from kvroute_router.kvevents.hub import PoolKVEvents
from kvroute_router.replicasync.sync import ReplicaSync
from kvroute_router.replicasync.wire import DispatchRecord, encode
from prometheus_client import CollectorRegistry

from tests.unit.router.router_fixtures import make_pool

OTHER = b"B" * 16
CAPACITY = 8
A, B, C = (1, 2, 3, 4), (11, 12, 13, 14), (21, 22, 23, 24)
"""Two tenants' contexts filling the engine (A stored first, so least recent), and a prompt
nobody holds."""


class FollowedEvents(PoolKVEvents):
    """A pool whose engines' events this replica follows (no ZMQ in a unit test)."""

    def trustworthy(self, endpoint: str) -> bool:
        return True


def _replica() -> tuple[ReplicaSync, Endpoint, PoolKVEvents]:
    store = Datastore()
    store.replace([make_pool("p", count=1)], [])
    (endpoint,) = store.endpoints()
    endpoint.metrics = EndpointMetrics(num_gpu_blocks=CAPACITY)
    events = FollowedEvents(BlockHashConfig(block_size=4))
    services = SharedServices()
    services.put(services_key(endpoint.pool), events)
    events.index.store(endpoint.name, A)
    events.index.store(endpoint.name, B)
    return ReplicaSync(None, store, services, CollectorRegistry()), endpoint, events


def _held(events: PoolKVEvents, endpoint: Endpoint, blocks: Sequence[int]) -> int:
    return events.index.match(blocks, [endpoint.name])[endpoint.name]


def test_a_context_another_replica_uses_is_not_the_one_forecast_to_go() -> None:
    sync, endpoint, events = _replica()
    # Another replica sends tenant A's next question there: A is in use, B is the least recent.
    sync.receive(encode(OTHER, [DispatchRecord(endpoint.pool, endpoint.name, (), held=A)]))
    events.mark_pending(endpoint.name, C, CAPACITY)  # this replica's own dispatch of a new one
    assert (_held(events, endpoint, A), _held(events, endpoint, B)) == (4, 0)


def test_another_replicas_new_blocks_forecast_evictions_here() -> None:
    sync, endpoint, events = _replica()
    sync.receive(encode(OTHER, [DispatchRecord(endpoint.pool, endpoint.name, C)]))
    assert (_held(events, endpoint, A), _held(events, endpoint, B)) == (0, 4)
    assert _held(events, endpoint, C) == 4  # pending there, as before
    assert events.index.forecast_counts()[endpoint.name][0] == 4


def test_without_the_engines_capacity_nothing_is_forecast() -> None:
    """Not scraped yet (no ``num_gpu_blocks``): the blocks are pending, nothing is hidden."""
    sync, endpoint, events = _replica()
    endpoint.metrics = None
    sync.receive(encode(OTHER, [DispatchRecord(endpoint.pool, endpoint.name, C, held=A)]))
    assert [_held(events, endpoint, x) for x in (A, B, C)] == [4, 4, 4]


def test_only_this_replicas_own_dispatches_are_counted_by_where_they_stood() -> None:
    """kvroute_kv_dispatch_blocks_total summed over replicas counts each dispatch once: the
    replica that dispatched counts it, the others (told by replica sync) do not."""
    sync, endpoint, events = _replica()
    sync.receive(encode(OTHER, [DispatchRecord(endpoint.pool, endpoint.name, C, held=A)]))
    assert sum(events.index.dispatch_counts()[endpoint.name]) == 0
    events.mark_pending(endpoint.name, A + C, CAPACITY)  # its own: A held, C being computed
    counts = events.index.dispatch_counts()[endpoint.name]
    assert counts == (4, 4, 0, 0, 0)
