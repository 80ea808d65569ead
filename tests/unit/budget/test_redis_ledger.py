"""The shared store: a real redis-server; two router replicas share one budget, and recent
spend survives a restart."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kvroute_api.route_policy import BudgetSpec, BudgetStoreSpec
from kvroute_router.budget.ledger import BudgetLedger, RequestEstimate
from kvroute_router.budget.meters import RedisMeterStore
from kvroute_router.budget.pricing import PoolEconomics

from tests.unit.conftest import ManualClock

THOUSAND = RequestEstimate(prompt_tokens=500, max_output_tokens=500)
BUDGETS = [BudgetSpec(name="team", tenant="*", usd=0.1, window="1h", max_concurrency=100)]
PATIENT = BudgetStoreSpec(timeout_ms=10_000)
"""These tests are about sharing one store, not about its timeout: at the default 250 ms a
loaded CI machine made some of thirty concurrent reservations fail open (unmetered)."""


async def test_two_replicas_share_one_budget(redis_client: Any, clock: ManualClock,
                                             strong_pool: PoolEconomics) -> None:
    replicas = [BudgetLedger(RedisMeterStore(redis_client), clock=clock) for _ in range(2)]
    for ledger in replicas:
        ledger.update_policy("chat", BUDGETS, store=PATIENT)
    decisions = await asyncio.gather(*(replicas[i % 2].reserve("chat", "a", [strong_pool],
                                                               THOUSAND) for i in range(30)))
    assert sum(d.admitted for d in decisions) == 10
    refused = next(d for d in decisions if not d.admitted)
    assert refused.error is not None and refused.error.status == 429
    assert refused.error.retry_after_s is not None and refused.error.retry_after_s > 0


async def test_spend_survives_a_router_restart(redis_client: Any, clock: ManualClock,
                                               strong_pool: PoolEconomics) -> None:
    before = BudgetLedger(RedisMeterStore(redis_client), clock=clock)
    before.update_policy("chat", BUDGETS, store=PATIENT)
    decision = await before.reserve("chat", "a", [strong_pool], THOUSAND)
    assert decision.reservation is not None
    await before.settle(decision.reservation, strong_pool, 500, 1500)  # 0.02 USD
    after = BudgetLedger(RedisMeterStore(redis_client), clock=clock)
    after.update_policy("chat", BUDGETS, store=PATIENT)
    assert await after.remaining_usd("chat", "a") == pytest.approx(0.08)
    clock.advance(3601)
    assert await after.remaining_usd("chat", "a") == pytest.approx(0.1)


async def test_concurrency_slots_are_released(redis_client: Any, clock: ManualClock,
                                              weak_pool: PoolEconomics) -> None:
    ledger = BudgetLedger(RedisMeterStore(redis_client), clock=clock, in_flight_deadline_s=30)
    ledger.update_policy("chat", [BudgetSpec(name="c", max_concurrency=2)], store=PATIENT)
    held = [await ledger.reserve("chat", "a", [weak_pool], THOUSAND) for _ in range(3)]
    assert [d.admitted for d in held] == [True, True, False]
    assert held[0].reservation is not None
    await ledger.settle(held[0].reservation, weak_pool, 10, 10)
    assert (await ledger.reserve("chat", "a", [weak_pool], THOUSAND)).admitted
    clock.advance(31)  # a replica that died holding slots cannot leak them past the deadline
    assert (await ledger.reserve("chat", "a", [weak_pool], THOUSAND)).admitted


async def test_same_named_policies_in_two_namespaces_have_separate_redis_meters(
        redis_client: Any, clock: ManualClock, strong_pool: PoolEconomics) -> None:
    ledger = BudgetLedger(RedisMeterStore(redis_client), clock=clock)
    for policy in ("team-a/chat", "team-b/chat"):
        ledger.update_policy(policy, BUDGETS, store=PATIENT)
    spent = [await ledger.reserve("team-a/chat", "a", [strong_pool], THOUSAND)
             for _ in range(11)]
    assert [d.admitted for d in spent] == [True] * 10 + [False]
    assert (await ledger.reserve("team-b/chat", "a", [strong_pool], THOUSAND)).admitted
    keys = {k.decode() if isinstance(k, bytes) else k
            for k in await redis_client.keys("kvroute:budget:*")}
    assert "kvroute:budget:{team-a/chat:a}:team:usd" in keys
    assert "kvroute:budget:{team-b/chat:a}:team:usd" in keys
