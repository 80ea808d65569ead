"""``healthy-filter``: endpoints known to be down are dropped, unless every candidate failed
its scrapes — then the ones the proxy has not seen refuse a connection are kept (the panic
rule; tests/loopback/test_fault_suite.py has the end-to-end case)."""

from __future__ import annotations

import logging
import time

import pytest
from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.request import LLMRequest
from kvroute_router.plugins.healthy_filter import HealthyFilter


def _endpoints(*failures: int) -> list[Endpoint]:
    return [Endpoint(name=f"e{i}", address=f"10.0.0.{i}:8000", pool="default/p",
                     scrape_failures=count) for i, count in enumerate(failures)]


def _names(endpoints: list[Endpoint]) -> list[str]:
    return [ep.name for ep in endpoints]


def test_endpoints_known_down_are_dropped_while_another_passes() -> None:
    eps = _endpoints(0, 3, 5, 2)
    eps[3].unavailable_until = time.monotonic() + 60  # refused a connection just now
    kept = HealthyFilter().filter(CycleState(), LLMRequest(model="m"), eps)
    assert _names(kept) == ["e0"]


def test_every_scrape_failing_keeps_the_endpoints_that_did_not_refuse(
        caplog: pytest.LogCaptureFixture) -> None:
    eps = _endpoints(3, 4, 9)
    eps[1].unavailable_until = time.monotonic() + 60
    plugin = HealthyFilter()
    with caplog.at_level(logging.WARNING, logger="kvroute_router.plugins.healthy_filter"):
        kept = plugin.filter(CycleState(), LLMRequest(model="m"), eps)
        again = plugin.filter(CycleState(), LLMRequest(model="m"), eps)
    assert _names(kept) == _names(again) == ["e0", "e2"]
    assert plugin.panics == 2
    assert len([r for r in caplog.records if "panic" in r.getMessage()]) == 1  # throttled


def test_nothing_is_kept_when_every_endpoint_refused() -> None:
    eps = _endpoints(3, 0)
    for ep in eps:
        ep.unavailable_until = time.monotonic() + 60
    assert HealthyFilter().filter(CycleState(), LLMRequest(model="m"), eps) == []
    assert HealthyFilter().filter(CycleState(), LLMRequest(model="m"), []) == []
