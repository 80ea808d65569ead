"""``scoring.prefillWaitMs``: a request whose endpoint is still computing the same prompt prefix
for an earlier request of this router waits for it (then reads it from the engine's cache)
instead of being sent at once and computing it a second time beside it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kvroute_router.director import Director
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.request import LLMRequest

from tests.unit.router.router_fixtures import (
    make_director,
    make_policy,
    make_pool,
    with_precise_prefix,
)

BLOCK = 32  # the fixture pool's engine.blockSize
CONTEXT = list(range(1000, 1000 + 10 * BLOCK))  # a tenant's shared context: 10 blocks
LOOP_CLOCK_SLACK_S = 0.002  # the event loop clock's granularity (uvloop: 1 ms), with margin


def _director(engine: dict[str, Any] | None = None, **scoring: Any) -> Director:
    policy = make_policy(scoring={"scorers": [{"type": "prefix-precise", "weight": 0},
                                              {"type": "prefill-cost"}], **scoring})
    pool = make_pool(count=2, engine={"blockSize": BLOCK, **(engine or {})})
    director, _ = make_director([pool], [policy])
    return with_precise_prefix(director, "default/local", BLOCK)


def _request(question: int, context: list[int] = CONTEXT) -> LLMRequest:
    return LLMRequest(model="chat", token_ids=[*context, *range(question, question + BLOCK)],
                      max_tokens=8)


def _by_name(director: Director) -> dict[str, Endpoint]:
    return {ep.name: ep for ep in director.datastore.endpoints()}


def _waits(director: Director, outcome: str) -> float | None:
    return director.metrics.registry.get_sample_value(
        "kvroute_prefill_waits_total", {"pool": "local", "outcome": outcome})


async def test_a_request_waits_while_its_endpoint_computes_its_prefix_for_an_earlier_one(
        ) -> None:
    director = _director(prefillWaitMs=5000)
    first = await director.open(_request(1))
    assert await first.wait_for_prefill(5.0) == 0.0  # nothing in flight before it
    holder = first.endpoint
    assert holder is not None and len(holder.prefill_in_flight) == 1
    # The second request matches the first's blocks as pending there, so it goes there too...
    second = await director.open(_request(2))
    assert second.endpoint is holder
    # ... and waits until the first one's answer starts: its prefix is computed by then.
    waiting = asyncio.create_task(second.wait_for_prefill(5.0))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    first.answering()
    waited = await asyncio.wait_for(waiting, 1.0)
    assert 0.04 < waited < 1.0
    assert _waits(director, "answered") == 1.0
    # The second one registered what *it* computes (its question), not the shared context.
    assert len(holder.prefill_in_flight) == 1
    for routed in (first, second):
        routed.close()
    assert all(not ep.prefill_in_flight for ep in director.datastore.endpoints())


async def test_the_wait_ends_at_the_limit_and_when_the_earlier_attempt_ends() -> None:
    director = _director(prefillWaitMs=200)  # the default of rounds 6-29 (now 0: off)
    (policy,) = director.datastore.policies().values()
    assert policy.spec.scoring.prefill_wait_ms == 200
    first = await director.open(_request(1))
    second = await director.open(_request(2))
    assert second.endpoint is first.endpoint
    # The earlier one never answers. The loop's timer ends the wait, and uvloop keeps time in
    # whole milliseconds (libuv's clock, read once per loop iteration): on time.monotonic() a
    # 50 ms timer can fire up to ~1 ms early.
    assert 0.05 - LOOP_CLOCK_SLACK_S <= await second.wait_for_prefill(0.05) < 1.0
    assert _waits(director, "timeout") == 1.0
    waiting = asyncio.create_task(second.wait_for_prefill(5.0))
    await asyncio.sleep(0.01)
    first.close()  # its attempt ended without an answer: nobody computes it now
    assert await asyncio.wait_for(waiting, 1.0) < 1.0
    second.close()
    assert all(not ep.prefill_in_flight for ep in director.datastore.endpoints())


async def test_a_cancelled_wait_and_a_retry_leave_nothing_behind() -> None:
    director = _director(prefillWaitMs=5000)
    eps = _by_name(director)
    first = await director.open(_request(1))
    second = await director.open(_request(2))
    waiting = asyncio.create_task(second.wait_for_prefill(5.0))
    await asyncio.sleep(0.01)
    waiting.cancel()  # the client went away while waiting
    with pytest.raises(asyncio.CancelledError):
        await waiting
    second.close(asyncio.CancelledError())
    other = next(ep for ep in eps.values() if ep is not first.endpoint)
    first.dispatch(other)  # a retry elsewhere moves what it computes
    assert list(other.prefill_in_flight) and not first.decision.endpoints[0].prefill_in_flight
    first.close()
    assert all(not ep.prefill_in_flight for ep in eps.values())


async def test_no_wait_when_turned_off_or_without_a_shared_prefix() -> None:
    off = _director()  # off is the default since round 30
    first = await off.open(_request(1))
    second = await off.open(_request(2))
    assert second.endpoint is first.endpoint
    assert await second.wait_for_prefill(5.0) == 0.0
    assert all(not ep.prefill_in_flight for ep in off.datastore.endpoints())
    for routed in (first, second):
        routed.close()
    on = _director(prefillWaitMs=5000)
    first = await on.open(_request(1))
    stranger = await on.open(_request(2, context=list(range(5000, 5000 + 10 * BLOCK))))
    assert first.endpoint is not None
    stranger.dispatch(first.endpoint)  # same endpoint, nothing in common: no wait
    assert await stranger.wait_for_prefill(5.0) == 0.0
    for routed in (first, stranger):
        routed.close()


async def test_on_priority_engines_a_request_reusing_a_prefix_in_computation_is_ranked_after_it(
        ) -> None:
    """schedulingPolicy Priority: the second request holds the shared context only as pending
    (the first is computing it), so its own penalty is small; ranked ahead of the first, it
    would compute the context itself, first. It gets one more than the first's priority, until
    the first starts answering (the context is cached then). The prefill wait is off: the
    in-flight prefixes are kept for the priority alone, and leave nothing behind."""
    director = _director(engine={"schedulingPolicy": "Priority"}, prefillWaitMs=0,
                         prefillPriorityMsPerToken=1.0)
    first = await director.open(_request(1))
    holder = first.endpoint
    assert holder is not None
    leader = first.decision.engine_priority(holder)
    assert leader == first.decision.request.received_unix_ms + 11 * BLOCK  # nothing held
    second = await director.open(_request(2))
    assert second.endpoint is holder
    assert second.decision.engine_priority(holder) == leader + 1  # its own: arrival + 1 block
    first.answering()
    third = await director.open(_request(3))
    assert third.endpoint is holder
    assert third.decision.engine_priority(holder) == (
        third.decision.request.received_unix_ms + BLOCK)
    for routed in (first, second, third):
        routed.close()
    assert all(not ep.prefill_in_flight for ep in director.datastore.endpoints())
