"""``healthy-filter`` and the panic rule: endpoints known to be down are dropped; only when no
pool of the policy (fallbacks included) has a healthy endpoint does the director route among
those that failed only their scrapes (tests/loopback/test_fault_suite.py has the end-to-end
case against an emulated fleet)."""

from __future__ import annotations

import logging
import time

import pytest
from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import STATE_HEALTH_PANIC, Endpoint, panic_possible
from kvroute_router.framework.lifecycle import RoutingError
from kvroute_router.framework.request import LLMRequest
from kvroute_router.plugins.healthy_filter import HealthyFilter

from tests.unit.router.router_fixtures import make_director, make_policy, make_pool


def _endpoints(*failures: int) -> list[Endpoint]:
    return [Endpoint(name=f"e{i}", address=f"10.0.0.{i}:8000", pool="default/p",
                     scrape_failures=count) for i, count in enumerate(failures)]


def _names(endpoints: list[Endpoint]) -> list[str]:
    return [ep.name for ep in endpoints]


def _panic_state() -> CycleState:
    state = CycleState()
    state.write(STATE_HEALTH_PANIC, True)
    return state


def test_endpoints_known_down_are_dropped_while_another_passes() -> None:
    eps = _endpoints(0, 3, 5, 2)
    eps[3].unavailable_until = time.monotonic() + 60  # refused a connection just now
    for state in (CycleState(), _panic_state()):  # a healthy one: the panic rule changes nothing
        assert _names(HealthyFilter().filter(state, LLMRequest(model="m"), eps)) == ["e0"]


def test_under_the_panic_rule_the_endpoints_that_did_not_refuse_are_kept(
        caplog: pytest.LogCaptureFixture) -> None:
    eps = _endpoints(3, 4, 9)
    eps[1].unavailable_until = time.monotonic() + 60
    assert panic_possible(eps)
    plugin = HealthyFilter()
    assert plugin.filter(CycleState(), LLMRequest(model="m"), eps) == []  # the first pass
    with caplog.at_level(logging.WARNING, logger="kvroute_router.plugins.healthy_filter"):
        kept = plugin.filter(_panic_state(), LLMRequest(model="m"), eps)
        again = plugin.filter(_panic_state(), LLMRequest(model="m"), eps)
    assert _names(kept) == _names(again) == ["e0", "e2"]
    assert plugin.panics == 2
    assert len([r for r in caplog.records if "panic" in r.getMessage()]) == 1  # throttled


def test_nothing_is_kept_when_every_endpoint_refused() -> None:
    eps = _endpoints(3, 0)
    for ep in eps:
        ep.unavailable_until = time.monotonic() + 60
    assert not panic_possible(eps)
    assert HealthyFilter().filter(_panic_state(), LLMRequest(model="m"), eps) == []
    assert HealthyFilter().filter(_panic_state(), LLMRequest(model="m"), []) == []


async def test_a_fallback_pool_takes_over_before_the_panic_rule() -> None:
    """Primary pool's scrapes all failing, a healthy fallback: the fallback serves. Both
    failing: the primary serves under the panic rule (not 503); every endpoint refusing: 503."""
    pools = [make_pool("a", base_port=8100), make_pool("b", base_port=8200)]
    director, store = make_director(pools, [make_policy(
        pools=[{"name": "a"}, {"name": "b", "role": "fallback"}])])
    for ep in store.endpoints():
        if ep.pool == "default/a":
            ep.scrape_failures = 5
    assert (await director.route(LLMRequest(model="chat"))).pool.name == "b"
    for ep in store.endpoints():
        ep.scrape_failures = 5
    assert (await director.route(LLMRequest(model="chat"))).pool.name == "a"
    for ep in store.endpoints():
        ep.unavailable_until = time.monotonic() + 60
    with pytest.raises(RoutingError) as refused:
        await director.route(LLMRequest(model="chat"))
    assert refused.value.status == 503
