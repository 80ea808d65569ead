"""The online batch stage: no delay when batching cannot help, joint assignment within the
budget share otherwise, and every waiter answered."""

from __future__ import annotations

import asyncio

from kvroute_api.route_policy import BatchingSpec, BudgetSpec
from kvroute_router.batching.batcher import BatchRequest, BatchRouter, PoolState
from kvroute_router.batching.quality import HeuristicQualityEstimator
from kvroute_router.budget.ledger import BudgetLedger
from kvroute_router.budget.metrics import BudgetMetrics
from kvroute_router.budget.pricing import PoolEconomics
from prometheus_client import CollectorRegistry

CHAT = {"policy_namespace": "default", "policy": "chat"}  # a policy's metric labels


def _request(prompt: str, tenant: str = "a") -> BatchRequest:
    return BatchRequest(prompt=prompt, prompt_tokens=500, max_output_tokens=500, tenant=tenant)


async def test_assigns_at_once_without_budget(weak_pool: PoolEconomics,
                                              strong_pool: PoolEconomics) -> None:
    router = BatchRouter("chat", BatchingSpec(window_ms=1000), HeuristicQualityEstimator(),
                         lambda: [PoolState(weak_pool), PoolState(strong_pool)], BudgetLedger())
    choice = await asyncio.wait_for(router.assign(_request("Prove that 17 is prime.")), 0.5)
    assert choice.pool == "strong" and choice.batch_size == 1 and choice.method == "per-request"


async def test_window_assigns_jointly_within_the_budget_share(
        weak_pool: PoolEconomics, strong_pool: PoolEconomics) -> None:
    registry = CollectorRegistry()
    ledger = BudgetLedger()
    # 86.4 USD/day = 0.001 USD/s; the tenant's rate makes a small per-request share.
    ledger.update_policy("chat", [BudgetSpec(name="team", usd=86.4, window="1d")])
    router = BatchRouter("chat", BatchingSpec(window_ms=50, max_batch_size=8),
                         HeuristicQualityEstimator(),
                         lambda: [PoolState(weak_pool), PoolState(strong_pool)], ledger,
                         metrics=BudgetMetrics(registry))
    prompts = [f"Compute the total of {i} + {i * 7} step by step." if i % 2 else f"Hi {i}"
               for i in range(8)]
    choices = await asyncio.wait_for(
        asyncio.gather(*(router.assign(_request(p)) for p in prompts)), 5)
    assert all(c.pool in {"weak", "strong"} for c in choices)
    assert any(c.batch_size > 1 for c in choices)
    share = await router._per_request_share("a")
    assert share is not None
    spent = sum(c.estimated_usd for c in choices if c.batch_size > 1)
    batched = sum(1 for c in choices if c.batch_size > 1)
    assert spent <= batched * share + 1e-12
    assert registry.get_sample_value("kvroute_batch_size_count", {**CHAT})


async def test_full_pools_leave_requests_unassigned() -> None:
    full = PoolEconomics(name="full", usd_per_input_token=0, usd_per_output_token=0,
                         max_sequences_per_replica=4)
    roomy = PoolEconomics(name="roomy", usd_per_input_token=0, usd_per_output_token=0,
                          max_sequences_per_replica=2)
    router = BatchRouter("chat", BatchingSpec(window_ms=20, max_batch_size=3),
                         HeuristicQualityEstimator(),
                         lambda: [PoolState(full, in_flight=4), PoolState(roomy)],
                         BudgetLedger())
    choices = await asyncio.wait_for(
        asyncio.gather(*(router.assign(_request(f"q{i}")) for i in range(3))), 5)
    assert sorted(c.pool or "" for c in choices) == ["", "roomy", "roomy"]
    assert all(c.batch_size == 3 for c in choices)
