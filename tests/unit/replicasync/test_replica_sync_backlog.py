"""Another replica's prefill backlog in this replica's endpoints: counted once per (sender,
dispatch id), taken off by that sender's answered record only, and forgotten on its own when the
answered record never comes (a Redis outage, a replica that died) — a lost record cannot leave an
engine looking busy for good."""

from __future__ import annotations

import asyncio

import pytest
from kvroute_router.datastore.store import Datastore
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.registry import SharedServices
from kvroute_router.framework.request import LLMRequest
from kvroute_router.replicasync import sync as sync_module
from kvroute_router.replicasync.sync import ReplicaSync
from kvroute_router.replicasync.wire import DispatchRecord, encode
from prometheus_client import CollectorRegistry

from tests.unit.router.router_fixtures import make_director, make_policy, make_pool

A, B = b"A" * 16, b"B" * 16


def _replica() -> tuple[ReplicaSync, Endpoint, Endpoint, CollectorRegistry]:
    store = Datastore()
    store.replace([make_pool("p", count=2)], [])
    first, second = store.endpoints()
    registry = CollectorRegistry()
    sync = ReplicaSync(None, store, SharedServices(), registry)
    return sync, first, second, registry


def _gauge(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("kvroute_replica_sync_remote_backlog_tokens")


def _dispatch(endpoint: Endpoint, dispatch_id: int, tokens: int) -> DispatchRecord:
    return DispatchRecord(endpoint.pool, endpoint.name, (7, 8), dispatch_id=dispatch_id,
                          tokens=tokens)


def _answered(endpoint: Endpoint, dispatch_id: int) -> DispatchRecord:
    return DispatchRecord(endpoint.pool, endpoint.name, (), answered=True,
                          dispatch_id=dispatch_id)


async def test_a_dispatch_counts_until_its_senders_answered_record() -> None:
    sync, first, second, registry = _replica()
    sync.receive(encode(A, [_dispatch(first, 1, 1200), _dispatch(second, 2, 300)]))
    sync.receive(encode(B, [_dispatch(first, 1, 50)]))  # B's id 1 is another dispatch
    assert (first.prefill_backlog, second.prefill_backlog) == (1250, 300)
    assert _gauge(registry) == 1550
    sync.receive(encode(A, [_dispatch(first, 1, 1200)]))  # a repeat counts once
    sync.receive(encode(B, [_answered(first, 2)]))  # B never sent its id 2: nothing
    assert first.prefill_backlog == 1250
    sync.receive(encode(A, [_answered(first, 1)]))
    assert (first.prefill_backlog, second.prefill_backlog) == (50, 300)
    await sync.stop()  # a stopping replica forgets what the others told it
    assert (first.prefill_backlog, second.prefill_backlog, _gauge(registry)) == (0, 0, 0)


async def test_a_lost_answered_record_is_forgotten_at_the_expiry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_module, "REMOTE_BACKLOG_TTL_S", 0.05)
    sync, first, _, registry = _replica()
    first.prefill_backlog = 100.0  # this replica's own dispatches stay
    sync.receive(encode(A, [_dispatch(first, 9, 4000)]))
    assert first.prefill_backlog == 4100
    await asyncio.sleep(0.2)
    assert (first.prefill_backlog, _gauge(registry)) == (100, 0)
    sync.receive(encode(A, [_answered(first, 9)]))  # late: nothing left to take off
    assert first.prefill_backlog == 100


async def test_another_replicas_first_bytes_count_as_its_endpoint_answering() -> None:
    """The per-try timer's "busy, not stuck": a first byte through another replica moves the
    endpoint's ``answers_started`` here as one of this replica's own does; an attempt that
    ended without one (a stalled engine's timed-out try) moves nothing."""
    sync, first, second, _ = _replica()
    sync.receive(encode(A, [DispatchRecord(first.pool, first.name, (), answered=True,
                                           started=True)]))
    sync.receive(encode(B, [DispatchRecord(first.pool, first.name, (), answered=True,
                                           dispatch_id=4, started=True)]))
    assert (first.answers_started, second.answers_started) == (2, 0)
    sync.receive(encode(A, [_answered(second, 1)]))  # ended, never answered
    assert second.answers_started == 0


async def test_every_attempts_first_byte_is_sent_once() -> None:
    """An attempt with no prefix or backlog to take back sent no answered record before; its
    first byte is one now (once, not again at its end)."""
    director, store = make_director([make_pool()], [make_policy()])
    sync = ReplicaSync(None, store, SharedServices(), CollectorRegistry())
    director.add_answering_listener(sync.on_answering)
    routed = await director.open(LLMRequest(model="chat", prompt_text="hello", max_tokens=4))
    endpoint = routed.endpoint
    assert endpoint is not None
    routed.answering()
    routed.answering()  # later pieces of the same answer
    routed.close()
    assert endpoint.answers_started == 1
    assert list(sync._queue) == [DispatchRecord(endpoint.pool, endpoint.name, (), answered=True,
                                                started=True)]


async def test_records_for_unknown_endpoints_count_nowhere() -> None:
    sync, first, second, registry = _replica()
    ghost = DispatchRecord(first.pool, "not-in-the-pool", (), dispatch_id=1, tokens=10**9)
    sync.receive(encode(A, [ghost]))
    assert (first.prefill_backlog, second.prefill_backlog, _gauge(registry)) == (0, 0, 0)


async def test_the_replicas_heard_from_lately_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """replicas(): this one plus every other sender heard from in the last PEER_WINDOW_S (its
    own messages, echoed by the channel, do not count); the admission queue releases this
    share of the room, and kvroute_replica_sync_replicas shows it."""
    sync, first, _, registry = _replica()
    now = [1000.0]
    monkeypatch.setattr(sync_module, "monotonic", lambda: now[0])
    assert sync.replicas() == 1
    sync.receive(encode(A, [_dispatch(first, 1, 10)]))
    sync.receive(encode(sync.sender_id, [_dispatch(first, 2, 10)]))
    now[0] += 6.0
    sync.receive(encode(B, [_dispatch(first, 3, 10)]))
    assert sync.replicas() == 3
    assert registry.get_sample_value("kvroute_replica_sync_replicas") == 3
    now[0] += sync_module.PEER_WINDOW_S - 5.0  # A quiet for 11 s, B for 5 s
    assert sync.replicas() == 2
    for k in range(sync_module.MAX_REPLICAS + 5):  # forged senders: bounded
        sync.receive(encode(bytes([k % 256, k // 256]) * 8, [_dispatch(first, 4, 1)]))
    assert sync.replicas() == sync_module.MAX_REPLICAS
