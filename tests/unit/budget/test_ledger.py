"""Budget ledger: reserve-then-settle, no overspend under concurrency, downgrade, 429 with
Retry-After naming the budget, sliding windows, live edits, per-replica shares, metrics."""

from __future__ import annotations

import asyncio

import pytest
from kvroute_api.route_policy import BudgetSpec
from kvroute_router.budget.ledger import BudgetLedger, RequestEstimate
from kvroute_router.budget.metrics import BudgetMetrics
from kvroute_router.budget.pricing import PoolEconomics
from prometheus_client import CollectorRegistry

from tests.unit.conftest import ManualClock

CHAT = {"policy_namespace": "default", "policy": "chat"}  # a policy's metric labels

THOUSAND = RequestEstimate(prompt_tokens=500, max_output_tokens=500)  # 1000 tokens


def _budget(**fields: object) -> BudgetSpec:
    return BudgetSpec.model_validate({"name": "team", "tenant": "*", **fields})


async def test_concurrent_reservations_never_overspend(
        clock: ManualClock, strong_pool: PoolEconomics) -> None:
    ledger = BudgetLedger(clock=clock)
    ledger.update_policy("chat", [_budget(usd=0.1, window="1h")])  # 10 strong requests
    decisions = await asyncio.gather(*(ledger.reserve("chat", "a", [strong_pool], THOUSAND)
                                       for _ in range(25)))
    admitted = [d for d in decisions if d.admitted]
    assert len(admitted) == 10
    assert sum(d.reservation.usd for d in admitted if d.reservation) <= 0.1 + 1e-12
    refused = [d for d in decisions if not d.admitted]
    assert all(d.error is not None and d.error.status == 429 for d in refused)


async def test_refusal_is_openai_style_and_names_the_budget(
        clock: ManualClock, strong_pool: PoolEconomics) -> None:
    ledger = BudgetLedger(clock=clock)
    ledger.update_policy("chat", [_budget(usd=0.01, window="1m")])
    assert (await ledger.reserve("chat", "a", [strong_pool], THOUSAND)).admitted
    clock.advance(20)
    decision = await ledger.reserve("chat", "a", [strong_pool], THOUSAND)
    assert decision.error is not None
    body = decision.error.body()["error"]
    assert isinstance(body, dict)
    assert body["code"] == "budget_exhausted" and body["type"] == "rate_limit_exceeded"
    assert "budget 'team'" in str(body["message"]) and body["param"] == "budgets[team].usd"
    # The first charge leaves the 60 s window 40 s from now.
    assert decision.error.headers() == {"retry-after": "40"}
    clock.advance(41)
    assert (await ledger.reserve("chat", "a", [strong_pool], THOUSAND)).admitted


async def test_settle_replaces_the_estimate_with_actual_usage(
        clock: ManualClock, strong_pool: PoolEconomics) -> None:
    ledger = BudgetLedger(clock=clock)
    ledger.update_policy("chat", [_budget(usd=0.02, window="1d")])
    first = await ledger.reserve("chat", "a", [strong_pool], THOUSAND)
    second = await ledger.reserve("chat", "a", [strong_pool], THOUSAND)
    assert first.reservation and second.reservation
    assert not (await ledger.reserve("chat", "a", [strong_pool], THOUSAND)).admitted
    charged = await ledger.settle(first.reservation, strong_pool, 500, 0)  # stopped early
    assert charged == pytest.approx(0.005)
    assert await ledger.remaining_usd("chat", "a") == pytest.approx(0.005)
    await ledger.cancel(second.reservation)
    assert await ledger.remaining_usd("chat", "a") == pytest.approx(0.015)


async def test_downgrade_goes_to_the_cheapest_pool(
        clock: ManualClock, weak_pool: PoolEconomics, strong_pool: PoolEconomics) -> None:
    ledger = BudgetLedger(clock=clock)
    ledger.update_policy("chat", [_budget(usd=0.012, window="1d", onExhausted="Downgrade")])
    first = await ledger.reserve("chat", "a", [strong_pool, weak_pool], THOUSAND)
    assert first.pool == "strong" and not first.downgraded
    second = await ledger.reserve("chat", "a", [strong_pool, weak_pool], THOUSAND)
    assert second.pool == "weak" and second.downgraded
    for _ in range(10):
        await ledger.reserve("chat", "a", [strong_pool, weak_pool], THOUSAND)
    last = await ledger.reserve("chat", "a", [strong_pool, weak_pool], THOUSAND)
    assert last.error is not None and last.error.status == 429


async def test_reject_budget_does_not_downgrade(
        clock: ManualClock, weak_pool: PoolEconomics, strong_pool: PoolEconomics) -> None:
    ledger = BudgetLedger(clock=clock)
    ledger.update_policy("chat", [_budget(usd=0.012, window="1d", onExhausted="Reject")])
    await ledger.reserve("chat", "a", [strong_pool, weak_pool], THOUSAND)
    assert not (await ledger.reserve("chat", "a", [strong_pool, weak_pool], THOUSAND)).admitted


async def test_star_budgets_apply_to_each_tenant_separately(
        clock: ManualClock, weak_pool: PoolEconomics) -> None:
    ledger = BudgetLedger(clock=clock)
    ledger.update_policy("chat", [_budget(requestsPerMinute=2),
                                  BudgetSpec(name="search", tenant="search",
                                             requests_per_minute=1)])
    assert len(ledger.budgets_for("chat", "search")) == 2
    for tenant, expected in (("a", 2), ("b", 2), ("search", 1)):
        results = [await ledger.reserve("chat", tenant, [weak_pool], THOUSAND)
                   for _ in range(3)]
        assert sum(d.admitted for d in results) == expected


async def test_tokens_per_minute_and_concurrency(
        clock: ManualClock, weak_pool: PoolEconomics) -> None:
    ledger = BudgetLedger(clock=clock)
    ledger.update_policy("chat", [_budget(tokensPerMinute=2500, maxConcurrency=5)])
    first = await ledger.reserve("chat", "a", [weak_pool], THOUSAND)
    second = await ledger.reserve("chat", "a", [weak_pool], THOUSAND)
    third = await ledger.reserve("chat", "a", [weak_pool], THOUSAND)
    assert first.admitted and second.admitted and third.error is not None
    assert third.error.param == "budgets[team].tokensPerMinute"
    ledger.update_policy("chat", [_budget(maxConcurrency=2)])
    blocked = await ledger.reserve("chat", "a", [weak_pool], THOUSAND)
    assert blocked.error is not None and blocked.error.param == "budgets[team].maxConcurrency"
    assert first.reservation is not None
    await ledger.settle(first.reservation, weak_pool, 500, 100)
    assert (await ledger.reserve("chat", "a", [weak_pool], THOUSAND)).admitted


async def test_live_budget_edit_applies_to_the_next_request(
        clock: ManualClock, strong_pool: PoolEconomics) -> None:
    ledger = BudgetLedger(clock=clock)
    ledger.update_policy("chat", [_budget(usd=1.0, window="1d")])
    for _ in range(3):
        assert (await ledger.reserve("chat", "a", [strong_pool], THOUSAND)).admitted
    ledger.update_policy("chat", [_budget(usd=0.03, window="1d")])  # already spent
    assert not (await ledger.reserve("chat", "a", [strong_pool], THOUSAND)).admitted
    ledger.update_policy("chat", [])
    assert (await ledger.reserve("chat", "a", [strong_pool], THOUSAND)).admitted


async def test_replica_share_scales_every_limit(
        clock: ManualClock, weak_pool: PoolEconomics) -> None:
    ledger = BudgetLedger(clock=clock, replica_share=0.5)
    ledger.update_policy("chat", [_budget(requestsPerMinute=10)])
    results = [await ledger.reserve("chat", "a", [weak_pool], THOUSAND) for _ in range(8)]
    assert sum(d.admitted for d in results) == 5
    with pytest.raises(ValueError, match="replica_share"):
        BudgetLedger(replica_share=0)


async def test_metrics_count_spend_and_outcomes(
        clock: ManualClock, weak_pool: PoolEconomics, strong_pool: PoolEconomics) -> None:
    registry = CollectorRegistry()
    ledger = BudgetLedger(clock=clock, metrics=BudgetMetrics(registry))
    ledger.update_policy("chat", [_budget(usd=0.012, window="1d", onExhausted="Downgrade")])
    first = await ledger.reserve("chat", "a", [strong_pool, weak_pool], THOUSAND)
    second = await ledger.reserve("chat", "a", [strong_pool, weak_pool], THOUSAND)
    assert first.reservation and second.reservation
    await ledger.settle(first.reservation, strong_pool, 500, 500)
    await ledger.remaining_usd("chat", "a")
    labels = {**CHAT, "budget": "team", "tenant": "a"}
    sample = registry.get_sample_value
    assert sample("kvroute_budget_spend_usd_total", labels) == pytest.approx(0.01)
    assert sample("kvroute_budget_tokens_total", {**labels, "kind": "output"}) == 500
    assert sample("kvroute_budget_requests_total", {**labels, "outcome": "downgraded"}) == 1
    assert sample("kvroute_budget_exhausted_total", {**labels, "limit": "usd"}) == 1
    assert sample("kvroute_budget_limit_usd", labels) == pytest.approx(0.012)
    assert sample("kvroute_budget_window_seconds", {**CHAT, "budget": "team"}) == 86400
