"""Prometheus access of the autoscaler and the budget status, against a real HTTP server on
loopback that speaks the Prometheus instant-query API (``/api/v1/query``) and answers from a
table of series."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from kvroute_api.route_policy import BudgetSpec
from kvroute_operator.budgets import policy_budget_status
from kvroute_operator.prometheus import (
    BUDGET_IN_FLIGHT_METRIC,
    BUDGET_REQUESTS_METRIC,
    BUDGET_SPEND_METRIC,
    BUDGET_TOKENS_METRIC,
    PrometheusMetrics,
    PrometheusUnavailableError,
    pod_selector,
)

pytestmark = pytest.mark.timeout(30)


class PrometheusServer:
    """Answers instant queries: each rule is (regex over the PromQL, vector result)."""

    def __init__(self) -> None:
        self.rules: list[tuple[str, list[dict[str, Any]]]] = []
        self.queries: list[str] = []

    async def query(self, request: web.Request) -> web.Response:
        promql = request.query.get("query", "")
        self.queries.append(promql)
        for pattern, result in self.rules:
            if re.search(pattern, promql):
                return web.json_response({"status": "success", "data": {
                    "resultType": "vector", "result": result}})
        return web.json_response({"status": "success",
                                  "data": {"resultType": "vector", "result": []}})


def sample(labels: dict[str, str], value: float) -> dict[str, Any]:
    return {"metric": labels, "value": [1700000000.0, str(value)]}


@pytest_asyncio.fixture()
async def prometheus() -> AsyncIterator[tuple[PrometheusServer, str]]:
    server = PrometheusServer()
    app = web.Application()
    app.router.add_get("/api/v1/query", server.query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield server, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_pool_load_per_pod(prometheus: tuple[PrometheusServer, str]) -> None:
    server, url = prometheus
    server.rules = [
        (r"vllm:num_requests_waiting", [sample({"pod": "llama-8b-5d-a1"}, 6),
                                        sample({"pod": "llama-8b-5d-b2"}, 2)]),
        (r"vllm:kv_cache_usage_perc", [sample({"pod": "llama-8b-5d-a1"}, 0.7)]),
    ]
    load = await PrometheusMetrics(url).pool_load(pod_selector("inference", "llama-8b"))
    assert load.waiting_requests == {"llama-8b-5d-a1": 6.0, "llama-8b-5d-b2": 2.0}
    assert load.kv_cache_usage == {"llama-8b-5d-a1": 0.7}
    assert 'namespace="inference"' in server.queries[0]
    assert 'pod=~"llama-8b-[a-z0-9]+-[a-z0-9]+"' in server.queries[0]


async def test_budget_usage_and_status(prometheus: tuple[PrometheusServer, str]) -> None:
    server, url = prometheus
    server.rules = [
        (rf"{BUDGET_SPEND_METRIC}.*budget=\"team-search\".*\[1d\]",
         [sample({"tenant": "search"}, 210.0)]),
        (rf"{BUDGET_TOKENS_METRIC}.*budget=\"team-search\"",
         [sample({"tenant": "search"}, 500000.0)]),
        (rf"{BUDGET_SPEND_METRIC}.*budget=\"per-tenant\"",
         [sample({"tenant": "a"}, 1.0), sample({"tenant": "b"}, 4.0)]),
    ]
    budgets = [BudgetSpec.model_validate(b) for b in (
        {"name": "team-search", "tenant": "search", "usd": 200, "window": "1d",
         "tokensPerMinute": 2000000},
        {"name": "per-tenant", "tenant": "*", "usd": 10, "window": "1h"},
    )]
    metrics = PrometheusMetrics(url)
    usage = {b.name: await metrics.budget_usage("chat", b) for b in budgets}
    statuses, used, condition = policy_budget_status(budgets, usage)
    search, per_tenant = statuses
    assert (search.spent_usd, search.limit_usd, search.window, search.percent_used) == (
        210.0, 200, "1d", 105)
    assert (per_tenant.tenant, per_tenant.spent_usd, per_tenant.percent_used) == ("b", 4.0, 40)
    assert used == 105
    assert condition.status == "True" and "team-search" in condition.message
    assert any('policy="chat"' in q and 'tenant="search"' in q for q in server.queries)


async def test_within_budget(prometheus: tuple[PrometheusServer, str]) -> None:
    server, url = prometheus
    server.rules = [(BUDGET_SPEND_METRIC, [sample({"tenant": "x"}, 5.0)])]
    budget = BudgetSpec.model_validate({"name": "b", "usd": 50})
    usage = {"b": await PrometheusMetrics(url).budget_usage("p", budget)}
    _, used, condition = policy_budget_status([budget], usage)
    assert used == 10 and condition.status == "False" and condition.reason == "WithinBudget"


async def test_request_rate_and_concurrency_count_towards_percent_used(
        prometheus: tuple[PrometheusServer, str]) -> None:
    """requestsPerMinute and maxConcurrency budgets: the admitted request rate and the requests
    in flight (summed over router replicas) are read, in the policy's namespace only."""
    server, url = prometheus
    server.rules = [
        (rf"{BUDGET_REQUESTS_METRIC}.*budget=\"rpm\"",
         [sample({"tenant": "a"}, 30.0), sample({"tenant": "b"}, 90.0)]),
        (rf"{BUDGET_IN_FLIGHT_METRIC}.*budget=\"lanes\"", [sample({"tenant": "a"}, 4.0)]),
    ]
    budgets = [BudgetSpec.model_validate(b) for b in (
        {"name": "rpm", "requestsPerMinute": 100},
        {"name": "lanes", "maxConcurrency": 4},
    )]
    metrics = PrometheusMetrics(url)
    usage = {b.name: await metrics.budget_usage("chat", b, "team-a") for b in budgets}
    assert usage["rpm"].requests_per_minute == 90.0 and usage["rpm"].tenant == "b"
    assert usage["rpm"].spent_usd is None and usage["rpm"].in_flight is None
    assert usage["lanes"].in_flight == 4.0
    statuses, used, condition = policy_budget_status(budgets, usage)
    assert [s.percent_used for s in statuses] == [90, 100]
    assert used == 100 and condition.status == "True" and "lanes" in condition.message
    assert all('policy_namespace="team-a"' in q for q in server.queries)
    rate = next(q for q in server.queries if BUDGET_REQUESTS_METRIC in q)
    assert 'outcome=~"admitted|downgraded"' in rate and "[1m]" in rate


async def test_unreachable_prometheus_is_an_error() -> None:
    with pytest.raises(PrometheusUnavailableError):
        await PrometheusMetrics("http://127.0.0.1:9").query("up")


async def test_cache_hit_rates_for_the_status_columns(
        prometheus: tuple[PrometheusServer, str]) -> None:
    """InferencePool CACHE-HIT from the engines' prefix-cache counters; CacheTier entries
    (memory: summed over replicas; redis: shared, counted once) and hit rate from the routers'
    response-cache metrics."""
    from kvroute_operator.prometheus import (
        percent,
        prefix_cache_hit_rate,
        response_cache_status,
    )

    server, url = prometheus
    server.rules = [
        (r"^sum\(increase\(vllm:prefix_cache_hits_total", [sample({}, 0.735)]),
        (r"sum by \(backend\) \(kvroute_response_cache_entries\{cache_tier=\"ns/answers\"",
         [sample({"backend": "memory"}, 30.0), sample({"backend": "redis"}, 200.0)]),
        (r"max by \(backend\) \(kvroute_response_cache_entries\{cache_tier=\"ns/answers\"",
         [sample({"backend": "memory"}, 20.0), sample({"backend": "redis"}, 100.0)]),
        (r"kvroute_response_cache_lookups_total\{cache_tier=\"ns/answers\",result=~\"exact",
         [sample({}, 0.125)]),
    ]
    metrics = PrometheusMetrics(url)
    rate = await prefix_cache_hit_rate(metrics, pod_selector("ns", "llama"))
    assert rate is not None and percent(rate) == "73.5%"
    entries, hit = await response_cache_status(metrics, "ns/answers")
    assert entries == 30 + 100 and hit is not None and percent(hit) == "12.5%"
    assert await response_cache_status(metrics, "ns/other") == (None, None)
