"""Admission control: sheddable traffic is shed first under saturation; the queue is bounded,
ordered by priority and times out, and refusals are counted by reason. (Token limits are the
director's: tests/unit/router/test_director.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from kvroute_api.route_policy import AdmissionSpec
from kvroute_router.admission import controller as controller_module
from kvroute_router.admission.controller import AdmissionController, EndpointLoad
from kvroute_router.budget.metrics import BudgetMetrics
from prometheus_client import CollectorRegistry

CHAT = {"policy_namespace": "default", "policy": "chat"}  # a policy's metric labels

SPEC = AdmissionSpec.model_validate({
    "maxPromptTokens": 100, "maxOutputTokens": 50, "maxQueueDepth": 2, "queueTimeoutMs": 50,
    "saturationQueueDepth": 4,
    "priorityClasses": [{"name": "batch", "priority": -10, "sheddable": True},
                        {"name": "interactive", "priority": 10},
                        {"name": "standard", "priority": 0}],
    "defaultPriorityClass": "standard"})


class Load:
    """Endpoint load the test sets."""

    def __init__(self) -> None:
        self.endpoints = [EndpointLoad(waiting=0, kv_utilization=0.1)]

    def __call__(self) -> list[EndpointLoad]:
        return self.endpoints

    def saturate(self) -> None:
        self.endpoints = [EndpointLoad(4, 0.2), EndpointLoad(0, 1.0)]

    def relieve(self) -> None:
        self.endpoints = [EndpointLoad(0, 0.2)]

    def open_one(self) -> None:
        """Room for one more request: one place below saturationQueueDepth 4."""
        self.endpoints = [EndpointLoad(3, 0.2), EndpointLoad(0, 1.0)]


def test_kv_saturation_is_the_policys() -> None:
    load = Load()
    load.endpoints = [EndpointLoad(0, 0.9)]
    assert not AdmissionController("chat", SPEC, load).saturated()  # default 1: a full cache
    strict = SPEC.model_copy(update={"saturation_kv_utilization": 0.8})
    assert AdmissionController("chat", strict, load).saturated()
    lax = SPEC.model_copy(update={"saturation_kv_utilization": 1.0})
    load.endpoints = [EndpointLoad(0, 0.99)]
    assert not AdmissionController("chat", lax, load).saturated()


def test_saturation_stops_at_the_first_endpoint_with_room() -> None:
    """The load is computed lazily per endpoint (one pass over a pool per request otherwise):
    an endpoint with room ends the walk; with none at all nothing is saturated."""
    walked: list[int] = []

    def load() -> Iterator[EndpointLoad]:
        for index, endpoint in enumerate([EndpointLoad(4, 0.2), EndpointLoad(0, 0.1),
                                          EndpointLoad(4, 0.2)]):
            walked.append(index)
            yield endpoint

    assert not AdmissionController("chat", SPEC, load).saturated()
    assert walked == [0, 1]
    assert not AdmissionController("chat", SPEC, lambda: iter(())).saturated()
    assert AdmissionController("chat", SPEC, lambda: iter([EndpointLoad(4, 0.2)])).saturated()


def test_priority_classes() -> None:
    controller = AdmissionController("chat", SPEC, Load())
    assert controller.priority_of({"x-kvroute-priority": "batch"}).sheddable
    assert controller.priority_of({}).name == "standard"
    assert controller.priority_of({"x-kvroute-priority": "unknown"}).name == "standard"


async def test_sheddable_is_shed_and_others_queue_under_saturation() -> None:
    load = Load()
    controller = AdmissionController("chat", SPEC, load)
    batch = controller.priority_of({"x-kvroute-priority": "batch"})
    interactive = controller.priority_of({"x-kvroute-priority": "interactive"})
    standard = controller.priority_of({})
    assert await controller.admit(batch) is None  # not saturated: nobody is shed
    load.saturate()
    shed = await controller.admit(batch)
    assert shed is not None and shed.status == 429 and shed.code == "overloaded"
    low = asyncio.create_task(controller.admit(standard))
    high = asyncio.create_task(controller.admit(interactive))
    for _ in range(5):
        await asyncio.sleep(0)
    assert controller.queue_depth == 2
    full = await controller.admit(standard)
    assert full is not None and full.code == "queue_full"
    load.open_one()
    assert controller.release_waiting() == 1
    for _ in range(5):
        await asyncio.sleep(0)
    assert high.done() and high.result() is None and not low.done()
    controller.release_waiting()
    assert await low is None


async def test_queue_timeout_answers_429() -> None:
    load = Load()
    load.saturate()
    registry = CollectorRegistry()
    controller = AdmissionController("chat", SPEC, load, metrics=BudgetMetrics(registry))
    outcome = await controller.admit(controller.priority_of({}))
    assert outcome is not None and outcome.code == "queue_timeout"
    assert registry.get_sample_value("kvroute_admission_rejected_total",
                                     {**CHAT, "reason": "queue_timeout"}) == 1
    assert outcome.headers() == {"retry-after": "1"}
    assert controller.queue_depth == 0


LONG_QUEUE = AdmissionSpec.model_validate({
    "maxQueueDepth": 2, "queueTimeoutMs": 60_000, "saturationQueueDepth": 4})


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_cancelled_waiters_leave_the_queue_at_once() -> None:
    # Clients that disconnect while queued (aiohttp cancels their handler) must not hold queue
    # places until the queue timeout: the next live request queues instead of queue_full.
    load = Load()
    load.saturate()
    registry = CollectorRegistry()
    controller = AdmissionController("chat", LONG_QUEUE, load, metrics=BudgetMetrics(registry))
    gone = [asyncio.create_task(controller.admit(controller.priority_of({})))
            for _ in range(2)]
    await _settle()
    assert controller.queue_depth == 2
    for task in gone:
        task.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    assert controller.queue_depth == 0
    live = asyncio.create_task(controller.admit(controller.priority_of({})))
    await _settle()
    assert not live.done() and controller.queue_depth == 1  # queued, not queue_full
    load.relieve()
    assert controller.release_waiting() == 1
    assert await asyncio.wait_for(live, 5) is None
    assert registry.get_sample_value("kvroute_admission_rejected_total",
                                     {**CHAT, "reason": "cancelled"}) == 2


async def test_a_slot_released_to_a_waiter_that_is_gone_goes_to_the_next_live_one() -> None:
    load = Load()
    load.saturate()
    controller = AdmissionController("chat", LONG_QUEUE, load)
    first = asyncio.create_task(controller.admit(controller.priority_of({})))
    await _settle()
    second = asyncio.create_task(controller.admit(controller.priority_of({})))
    await _settle()
    load.open_one()
    assert controller.release_waiting() == 1  # the slot goes to `first` ...
    first.cancel()  # ... whose client disconnects before it runs
    await asyncio.gather(first, return_exceptions=True)
    assert first.cancelled()
    # The slot moved on to the live waiter (no further release_waiting call needed).
    assert await asyncio.wait_for(second, 5) is None
    assert controller.queue_depth == 0


async def test_a_release_lets_go_as_many_as_the_endpoints_have_room_for() -> None:
    """Room is the queue places left below saturationQueueDepth (4) over the endpoints that
    are not saturated: 2 + 1 here. Releasing one waiter per call starved the engines once the
    queue had formed (a call that found no room let nothing go, and nothing made up for it)."""
    load = Load()
    load.saturate()
    controller = AdmissionController("chat", AdmissionSpec.model_validate(
        {"maxQueueDepth": 10, "queueTimeoutMs": 60_000, "saturationQueueDepth": 4}), load)
    waiters = [asyncio.create_task(controller.admit(controller.priority_of({})))
               for _ in range(5)]
    await _settle()
    assert controller.queue_depth == 5
    load.endpoints = [EndpointLoad(2, 0.2), EndpointLoad(3, 0.2), EndpointLoad(4, 0.2),
                      EndpointLoad(0, 1.0)]
    assert controller.release_waiting() == 3
    assert controller.queue_depth == 2
    await _settle()
    assert [task.done() for task in waiters] == [True, True, True, False, False]
    load.saturate()
    assert controller.release_waiting() == 0
    for task in waiters[3:]:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_a_replica_lets_go_its_share_of_the_room() -> None:
    """With three router replicas (replica sync's count) each judging the room on its own view
    of the engines, each lets go a third of it, rounded up: 7 places -> 3, then 1 place -> 1
    (never nothing while there is room). Letting go the whole room made the three send three
    times what the engines had room for before their dispatch records arrived."""
    load = Load()
    load.saturate()
    replicas = [3]
    controller = AdmissionController("chat", AdmissionSpec.model_validate(
        {"maxQueueDepth": 10, "queueTimeoutMs": 60_000, "saturationQueueDepth": 4}), load,
        replicas=lambda: replicas[0])
    waiters = [asyncio.create_task(controller.admit(controller.priority_of({})))
               for _ in range(8)]
    await _settle()
    load.endpoints = [EndpointLoad(0, 0.2), EndpointLoad(1, 0.2), EndpointLoad(4, 0.2)]
    assert controller.release_room(8) == 3 and controller.release_waiting() == 3
    await _settle()
    load.endpoints = [EndpointLoad(3, 0.2), EndpointLoad(4, 0.2)]
    assert controller.release_waiting() == 1
    await _settle()
    replicas[0] = 1  # the others stopped: the whole room again
    load.endpoints = [EndpointLoad(0, 0.2), EndpointLoad(2, 0.2)]
    assert controller.release_waiting() == 4
    assert controller.queue_depth == 0
    await asyncio.gather(*waiters)


async def test_a_replica_lets_go_only_its_own_among_the_fleets_oldest_waiters() -> None:
    """With the other replicas' waiters known (replica sync's waiting reports), a replica's
    share of the room goes to the fleet's oldest: while another replica's waiters arrived
    first, this one lets go none of its own and leaves the room to them; once they are gone,
    its share. A waiter that has waited half the queue timeout goes whatever the others
    report (forged or stale reports delay a queue, never stop it). Each change of the queue is
    reported (``on_change``)."""
    load = Load()
    load.saturate()
    changes: list[int] = []
    older = int(time.time() * 1000) - 1_000
    peers: list[tuple[int, int]] = [(0, older + i) for i in range(4)]
    controller = AdmissionController("chat", AdmissionSpec.model_validate(
        {"maxQueueDepth": 10, "queueTimeoutMs": 60_000, "saturationQueueDepth": 4}), load,
        replicas=lambda: 3, peers_waiting=lambda: peers,
        on_change=lambda: changes.append(controller.queue_depth))
    waiters = [asyncio.create_task(controller.admit(controller.priority_of({})))
               for _ in range(4)]
    await _settle()
    assert changes[-1] == 4
    load.endpoints = [EndpointLoad(0, 0.2), EndpointLoad(1, 0.2), EndpointLoad(4, 0.2)]
    assert controller.release_room(8) == 3  # the share of 7 places
    assert controller.release_waiting() == 0  # the 3 oldest of the fleet wait elsewhere
    later = time.time() * 1000 + 31_000  # half the timeout on: they go anyway
    assert controller.release_count(4, controller.waiting_keys, now_ms=later) == 3
    peers.clear()  # the other replica let its waiters go
    assert controller.release_waiting() == 3 and changes[-1] == 1
    await _settle()
    load.endpoints = [EndpointLoad(0, 0.2)]
    assert controller.release_waiting() == 1
    await asyncio.gather(*waiters)


async def test_released_waiters_hold_their_room_until_they_resume() -> None:
    """A released request is not in the load until it is routed: until its waiter resumes it
    takes one place, so neither a second release nor a new arrival takes the same room."""
    load = Load()
    load.saturate()
    controller = AdmissionController("chat", LONG_QUEUE, load)
    first = asyncio.create_task(controller.admit(controller.priority_of({})))
    second = asyncio.create_task(controller.admit(controller.priority_of({})))
    await _settle()
    load.open_one()
    assert controller.release_waiting() == 1
    assert controller.saturated()  # the one place is taken by `first`, in transit
    assert controller.release_waiting() == 0
    assert await asyncio.wait_for(first, 5) is None
    assert not controller.saturated()  # resumed: its dispatch is the load's to show now
    assert controller.release_waiting() == 1
    assert await asyncio.wait_for(second, 5) is None


async def test_a_released_waiter_that_is_gone_gives_its_room_back() -> None:
    load = Load()
    load.saturate()
    controller = AdmissionController("chat", LONG_QUEUE, load)
    gone = asyncio.create_task(controller.admit(controller.priority_of({})))
    await _settle()
    load.open_one()
    assert controller.release_waiting() == 1
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert not controller.saturated()


async def _three_waiters_released_one_by_one(after: int | None) -> tuple[list[str], list[str]]:
    """Three waiters a, b, c (in that order) let go one at a time: the order they went in,
    and those told they went newest-first."""
    load = Load()
    load.saturate()
    controller = AdmissionController("chat", AdmissionSpec.model_validate(
        {"maxQueueDepth": 10, "queueTimeoutMs": 60_000, "saturationQueueDepth": 4,
         "newestFirstAfterMs": after}), load)
    released: list[str] = []
    told: list[str] = []

    async def wait(name: str) -> None:
        error = await controller.admit(controller.priority_of({}),
                                       on_newest_first=lambda: told.append(name))
        assert error is None
        released.append(name)

    waiters = []
    for name in ("a", "b", "c"):
        waiters.append(asyncio.create_task(wait(name)))
        await _settle()
        await asyncio.sleep(0.002)  # distinct arrival ms
    assert controller.queue_depth == 3
    assert controller.newest_first_now() is (after == 0)
    for _ in range(3):
        load.endpoints = [EndpointLoad(3, 0.2)]  # room for one
        assert controller.release_waiting() == 1
        await _settle()
        load.saturate()
    await asyncio.gather(*waiters)
    return released, told


async def test_a_late_queue_lets_the_newest_go_first_and_says_so() -> None:
    """newestFirstAfterMs (adaptive LIFO): once the oldest waiter has waited that long a
    release lets the newest go first — the highest priority class still first — and tells the
    request (the engines then serve it newest-first too). Below it, or unset, the oldest goes
    first and nothing is said."""
    assert await _three_waiters_released_one_by_one(0) == (["c", "b", "a"], ["c", "b", "a"])
    assert await _three_waiters_released_one_by_one(60_000) == (["a", "b", "c"], [])
    assert await _three_waiters_released_one_by_one(None) == (["a", "b", "c"], [])

    # Priority classes first: an older interactive waiter goes before a newer standard one.
    load = Load()
    load.saturate()
    controller = AdmissionController("chat", SPEC.model_copy(update={
        "newest_first_after_ms": 0, "max_queue_depth": 10, "queue_timeout_ms": 60_000}), load)
    interactive = asyncio.create_task(controller.admit(controller.priority_of(
        {"x-kvroute-priority": "interactive"})))
    await _settle()
    standard = asyncio.create_task(controller.admit(controller.priority_of({})))
    await _settle()
    load.endpoints = [EndpointLoad(3, 0.2)]
    assert controller.release_waiting() == 1
    await _settle()
    assert interactive.done() and not standard.done()
    standard.cancel()
    await asyncio.gather(standard, return_exceptions=True)


class Clock:
    """The controller's wall clock, set by the test (``time.time()``, in seconds)."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now


async def test_released_waiters_are_counted_by_the_order_the_queue_went_in(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kvroute_admission_released_total{order}: how many waited in the queue and went, first
    come first served (arrival) or newest-first (newestFirstAfterMs) — what tells an SRE (and
    the benchmark) whether newest-first ever started. A cancelled waiter is not counted."""
    clock = Clock()  # a shared machine may stall past newestFirstAfterMs: the test sets time
    monkeypatch.setattr(controller_module, "time", clock)
    load = Load()
    load.saturate()
    registry = CollectorRegistry()
    spec = AdmissionSpec.model_validate({"maxQueueDepth": 10, "queueTimeoutMs": 60_000,
                                         "saturationQueueDepth": 4, "newestFirstAfterMs": 30})
    controller = AdmissionController("chat", spec, load, metrics=BudgetMetrics(registry))
    waiters = [asyncio.create_task(controller.admit(controller.priority_of({})))
               for _ in range(4)]
    await _settle()
    waiters[3].cancel()
    await _settle()

    def released(order: str) -> float | None:
        return registry.get_sample_value("kvroute_admission_released_total",
                                         {**CHAT, "order": order})

    load.endpoints = [EndpointLoad(3, 0.2)]  # room for one, before the queue is late
    assert controller.release_waiting() == 1
    assert (released("arrival"), released("newest_first")) == (1, 0)
    await _settle()  # the released waiter resumes: out of transit
    clock.now += 0.04  # the oldest waiter has now waited past 30 ms
    load.endpoints = [EndpointLoad(2, 0.2)]  # room for two
    assert controller.release_waiting() == 2
    assert (released("arrival"), released("newest_first")) == (1, 2)
    assert await asyncio.gather(*waiters[:3]) == [None, None, None]
    await asyncio.gather(waiters[3], return_exceptions=True)


def test_a_late_queue_does_not_defer_to_the_fleets_oldest() -> None:
    """With newest-first on, a replica releases its own share of the room whatever the other
    replicas hold (their keys are an oldest-first order)."""
    load = Load()
    load.endpoints = [EndpointLoad(0, 0.2)]  # room 4
    controller = AdmissionController(
        "chat", AdmissionSpec.model_validate({"saturationQueueDepth": 4}), load,
        peers_waiting=lambda: [(0, 1), (0, 2), (0, 3), (0, 4)])
    mine = [(0, 10), (0, 11)]
    assert controller.release_count(2, lambda n: mine[:n], now_ms=100) == 0
    assert controller.release_count(2, lambda n: mine[:n], now_ms=100, newest_first=True) == 2
