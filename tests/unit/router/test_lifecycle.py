"""One request lifecycle (issue 13.3): whatever raises or is cancelled after admission — a
plugin while scheduling, a plugin on dispatch, the server while serving — the admission slot,
the budget reservation and the in-flight count are given back, and the request is finished
exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from kvroute_router.admission.hook import BudgetHook
from kvroute_router.director import Director
from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.lifecycle import Outcome, RoutingError
from kvroute_router.framework.request import LLMRequest

from tests.unit.router.router_fixtures import make_director, make_policy, make_pool


class FaultyScorer:
    """A scorer with a bug: raises while scoring or on dispatch for marked prompts."""

    name = "running-requests"

    def score(self, state: CycleState, request: LLMRequest,
              endpoints: Sequence[Endpoint]) -> list[float]:
        if "score-bug" in request.prompt_text:
            raise RuntimeError("scorer bug")
        return [0.0] * len(endpoints)

    def on_dispatch(self, state: CycleState, request: LLMRequest, endpoint: Endpoint) -> None:
        if "dispatch-bug" in request.prompt_text:
            raise RuntimeError("dispatch bug")


class Finished:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def on_complete(self, decision: Any, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


HOOKS: dict[int, BudgetHook] = {}


async def _settled(director: Director) -> None:
    """Wait (bounded) until the budget hook's settle tasks ran: releases are asynchronous."""
    hook = HOOKS[id(director)]
    for _ in range(500):
        if not hook._tasks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("budget settles did not run within 5 s")


def _director() -> tuple[Director, Finished]:
    """One concurrency slot and a 1,000-token-a-minute budget: a leaked slot or reservation
    refuses the next request."""
    policy = make_policy(pools=[{"name": "local"}], budgets=[
        {"name": "one", "maxConcurrency": 1, "tokensPerMinute": 1000}],
        scoring={"scorers": [{"type": "running-requests"}]})
    director, store = make_director([make_pool()], [policy])
    director.registry.register("running-requests", "scorer",
                               lambda context: FaultyScorer())
    hook = BudgetHook(store)
    HOOKS[id(director)] = hook
    director.add_admission_hook(hook)
    finished = Finished()
    director.add_completion_observer(finished)
    return director, finished


def _request(prompt: str = "fine") -> LLMRequest:
    return LLMRequest(model="chat", prompt_text=prompt, max_tokens=400)


def _in_flight(director: Director) -> int:
    return sum(e.in_flight for e in director.datastore.endpoints())


async def _serve_one(director: Director) -> None:
    """A normal request gets the slot and budget (so nothing was leaked), then finishes."""
    await _settled(director)
    async with await director.open(_request()) as routed:
        routed.finish(routed.decision.endpoints[0], Outcome(status=200, prompt_tokens=4,
                                                            completion_tokens=4))
    assert _in_flight(director) == 0
    await _settled(director)


async def test_a_plugin_raising_while_scheduling_frees_what_admission_held() -> None:
    director, _ = _director()
    for _ in range(3):
        with pytest.raises(RuntimeError, match="scorer bug"):
            await director.route(_request("score-bug"))
        await _settled(director)
    decision = await director.route(_request())  # the slot is free: not 429
    director.finish(decision, None, Outcome(status=0))


async def test_a_plugin_raising_on_dispatch_frees_the_slot_and_the_in_flight_count() -> None:
    director, finished = _director()
    for _ in range(3):
        with pytest.raises(RuntimeError, match="dispatch bug"):
            await director.open(_request("dispatch-bug"))
        assert _in_flight(director) == 0
        await _settled(director)
    assert [o.status for o in finished.outcomes] == [500, 500, 500]
    await _serve_one(director)


async def test_an_error_or_cancellation_while_serving_finishes_the_request_once() -> None:
    director, finished = _director()
    with pytest.raises(ValueError):
        async with await director.open(_request()):
            assert _in_flight(director) == 1
            raise ValueError("the server broke while relaying")
    assert _in_flight(director) == 0 and finished.outcomes[-1].status == 500
    await _settled(director)

    async def serve_forever() -> None:
        async with await director.open(_request()):
            await asyncio.sleep(3600)

    task = asyncio.ensure_future(serve_forever())
    for _ in range(100):  # bounded: the task routes within a few loop turns
        if _in_flight(director):
            break
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _in_flight(director) == 0 and finished.outcomes[-1].status == 499
    assert len(finished.outcomes) == 2
    await _serve_one(director)
    with pytest.raises(RoutingError):  # the budget is real: a second held request is refused
        held = await director.open(_request())
        try:
            await director.open(_request())
        finally:
            held.close()


async def test_retries_dispatch_one_attempt_at_a_time() -> None:
    director, finished = _director()
    routed = await director.open(_request())
    first, second = routed.decision.endpoints[:2]
    assert (first.in_flight, second.in_flight) == (1, 0)
    routed.dispatch(second)
    assert (first.in_flight, second.in_flight) == (0, 1)
    routed.finish(second, Outcome(status=200))
    routed.close()
    routed.finish(second, Outcome(status=500))
    assert _in_flight(director) == 0 and [o.status for o in finished.outcomes] == [200]
