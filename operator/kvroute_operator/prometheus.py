"""Prometheus access for the autoscaler and the budget status, through ``prometheus-api-client``
(synchronous, so each query runs in a worker thread).

Metric names live here once:

* engine metrics (vLLM): :data:`WAITING_METRIC`, :data:`KV_USAGE_METRIC`, selected by the
  ``namespace`` and ``pod`` labels that Prometheus' Kubernetes pod discovery attaches;
* engine prefix-cache counters :data:`PREFIX_HITS_METRIC` / :data:`PREFIX_QUERIES_METRIC`
  (tokens), for ``InferencePool.status.prefixCacheHitRate`` over :data:`HIT_RATE_WINDOW`;
* router response-cache metrics :data:`CACHE_LOOKUPS_METRIC` and :data:`CACHE_ENTRIES_METRIC`
  (label ``cache_tier`` = the tier's ``namespace/name``), for ``CacheTier.status``;
* router budget metrics: :data:`BUDGET_SPEND_METRIC`, :data:`BUDGET_TOKENS_METRIC`,
  :data:`BUDGET_REQUESTS_METRIC` (counters) and :data:`BUDGET_IN_FLIGHT_METRIC` (gauge, per
  replica), labelled ``policy_namespace``, ``policy``, ``budget`` and ``tenant`` (the router's
  budget ledger exports them). One budget kind per limit: ``usd`` → spend over the window,
  ``tokensPerMinute`` → token rate, ``requestsPerMinute`` → admitted request rate,
  ``maxConcurrency`` → requests in flight summed over replicas.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, Final

from kvroute_api.route_policy import BudgetSpec

from kvroute_operator.autoscaling import PoolLoad

WAITING_METRIC: Final = "vllm:num_requests_waiting"
KV_USAGE_METRIC: Final = "vllm:kv_cache_usage_perc"
BUDGET_SPEND_METRIC: Final = "kvroute_budget_spend_usd_total"
BUDGET_TOKENS_METRIC: Final = "kvroute_budget_tokens_total"
BUDGET_REQUESTS_METRIC: Final = "kvroute_budget_requests_total"
BUDGET_IN_FLIGHT_METRIC: Final = "kvroute_budget_in_flight"
BUDGET_NAMESPACE_LABEL: Final = "policy_namespace"
PREFIX_HITS_METRIC: Final = "vllm:prefix_cache_hits_total"
PREFIX_QUERIES_METRIC: Final = "vllm:prefix_cache_queries_total"
CACHE_LOOKUPS_METRIC: Final = "kvroute_response_cache_lookups_total"
CACHE_ENTRIES_METRIC: Final = "kvroute_response_cache_entries"
HIT_RATE_WINDOW: Final = "1h"
QUERY_TIMEOUT_SECONDS: Final = 5


class PrometheusUnavailableError(Exception):
    """Prometheus could not be queried (unreachable, error answer, malformed data)."""


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def pod_selector(namespace: str, deployment: str) -> str:
    """Label matchers for the pods of a Deployment (``NAME-<hash>-<suffix>``)."""
    pods = re.escape(deployment).replace("\\-", "-")
    return f'namespace="{_quote(namespace)}",pod=~"{_quote(pods)}-[a-z0-9]+-[a-z0-9]+"'


def selector_matchers(namespace: str, pod_names: list[str]) -> str:
    """Label matchers for an explicit set of pods (External pools selected by labels)."""
    alternatives = "|".join(re.escape(p) for p in sorted(pod_names)) or "^$"
    return f'namespace="{_quote(namespace)}",pod=~"{_quote(alternatives)}"'


@dataclass(frozen=True)
class BudgetUsage:
    """Usage of one budget by its worst tenant (the one closest to any of its limits): spend in
    the window, tokens and admitted requests per minute, requests in flight. ``None`` for a
    limit the budget does not set."""

    spent_usd: float | None
    tokens_per_minute: float | None
    tenant: str | None
    requests_per_minute: float | None = None
    in_flight: float | None = None


class PrometheusMetrics:
    """Queries one Prometheus server."""

    def __init__(self, url: str) -> None:
        from prometheus_api_client import PrometheusConnect

        self.url = url
        self._client = PrometheusConnect(url=url, disable_ssl=False,
                                         timeout=QUERY_TIMEOUT_SECONDS)

    def _query_sync(self, promql: str) -> list[dict[str, Any]]:
        try:
            result = self._client.custom_query(promql)
        except Exception as exc:  # requests' and the client's errors alike
            raise PrometheusUnavailableError(f"{self.url}: {exc}") from exc
        if not isinstance(result, list):
            raise PrometheusUnavailableError(f"{self.url}: unexpected answer to {promql!r}")
        return [r for r in result if isinstance(r, dict)]

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant-vector samples of a query."""
        return await asyncio.to_thread(self._query_sync, promql)

    async def by_label(self, promql: str, label: str) -> dict[str, float]:
        """{label value: sample value} of an instant query."""
        out: dict[str, float] = {}
        for sample in await self.query(promql):
            key = (sample.get("metric") or {}).get(label, "")
            try:
                out[str(key)] = float(sample["value"][1])
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise PrometheusUnavailableError(
                    f"{self.url}: malformed sample {sample!r}") from exc
        return out

    async def pool_load(self, matchers: str) -> PoolLoad:
        """Waiting requests and KV-cache usage of each pod matched."""
        waiting = await self.by_label(f"max by (pod) ({WAITING_METRIC}{{{matchers}}})", "pod")
        kv = await self.by_label(f"max by (pod) ({KV_USAGE_METRIC}{{{matchers}}})", "pod")
        return PoolLoad(waiting_requests=waiting, kv_cache_usage=kv)

    async def budget_usage(self, policy: str, budget: BudgetSpec,
                           namespace: str | None = None) -> BudgetUsage:
        """Usage of every limit the budget sets, per tenant; the worst tenant counts (a ``*``
        budget applies to each tenant separately). ``namespace``: the policy's, matched on the
        ``policy_namespace`` label, so same-named policies of other namespaces do not count."""
        matchers = f'policy="{_quote(policy)}",budget="{_quote(budget.name)}"'
        if namespace is not None:
            matchers = f'{BUDGET_NAMESPACE_LABEL}="{_quote(namespace)}",' + matchers
        if budget.tenant != "*":
            matchers += f',tenant="{_quote(budget.tenant)}"'
        measured: dict[str, tuple[float, dict[str, float]]] = {}
        if budget.usd is not None:
            measured["usd"] = (budget.usd, await self.by_label(
                f"sum by (tenant) (increase({BUDGET_SPEND_METRIC}{{{matchers}}}"
                f"[{budget.window}]))", "tenant"))
        if budget.tokens_per_minute is not None:
            measured["tokens"] = (budget.tokens_per_minute, await self.by_label(
                f"sum by (tenant) (rate({BUDGET_TOKENS_METRIC}{{{matchers}}}[1m])) * 60",
                "tenant"))
        if budget.requests_per_minute is not None:
            measured["requests"] = (budget.requests_per_minute, await self.by_label(
                f"sum by (tenant) (rate({BUDGET_REQUESTS_METRIC}{{{matchers},"
                f'outcome=~"admitted|downgraded"}}[1m])) * 60', "tenant"))
        if budget.max_concurrency is not None:
            measured["concurrency"] = (budget.max_concurrency, await self.by_label(
                f"sum by (tenant) ({BUDGET_IN_FLIGHT_METRIC}{{{matchers}}})", "tenant"))
        worst_tenant: str | None = None
        worst = -1.0
        for tenant in sorted({t for _, values in measured.values() for t in values}):
            share = max(values.get(tenant, 0.0) / limit for limit, values in measured.values())
            if share > worst:
                worst, worst_tenant = share, tenant

        def of(kind: str) -> float | None:
            if kind not in measured:
                return None
            values = measured[kind][1]
            return values.get(worst_tenant, 0.0) if worst_tenant is not None else 0.0

        return BudgetUsage(spent_usd=of("usd"), tokens_per_minute=of("tokens"),
                           tenant=worst_tenant, requests_per_minute=of("requests"),
                           in_flight=of("concurrency"))


def percent(ratio: float) -> str:
    """A ratio as the status' ``12.5%`` form."""
    return f"{min(100.0, max(0.0, 100.0 * ratio)):.1f}%"


async def _single(metrics: PrometheusMetrics, promql: str) -> float | None:
    samples = await metrics.by_label(promql, "__none__")
    value = samples.get("")
    return None if value is None or value != value else value  # NaN: 0/0


async def prefix_cache_hit_rate(metrics: PrometheusMetrics, matchers: str) -> float | None:
    """Share of prompt tokens the pool's engines found in their prefix cache over the window
    (None: no queries in the window)."""
    return await _single(metrics, (
        f"sum(increase({PREFIX_HITS_METRIC}{{{matchers}}}[{HIT_RATE_WINDOW}])) / "
        f"sum(increase({PREFIX_QUERIES_METRIC}{{{matchers}}}[{HIT_RATE_WINDOW}]))"))


async def response_cache_status(metrics: PrometheusMetrics, tier: str
                                ) -> tuple[int | None, float | None]:
    """(entries, hit rate over the window) of a CacheTier (``namespace/name``) as its routers
    report them: entries summed over replicas for ``memory`` (each holds its own), the largest
    report for ``redis`` (shared); hit rate = hits / (hits + misses), skipped requests not
    counted."""
    matcher = f'cache_tier="{_quote(tier)}"'
    by_backend_sum = await metrics.by_label(
        f"sum by (backend) ({CACHE_ENTRIES_METRIC}{{{matcher}}})", "backend")
    by_backend_max = await metrics.by_label(
        f"max by (backend) ({CACHE_ENTRIES_METRIC}{{{matcher}}})", "backend")
    entries: int | None = None
    if by_backend_sum or by_backend_max:
        entries = int(by_backend_sum.get("memory", 0.0) + by_backend_max.get("redis", 0.0))
    rate = await _single(metrics, (
        f'sum(increase({CACHE_LOOKUPS_METRIC}{{{matcher},result=~"exact|semantic"}}'
        f"[{HIT_RATE_WINDOW}])) / sum(increase({CACHE_LOOKUPS_METRIC}{{{matcher},"
        f'result=~"exact|semantic|miss"}}[{HIT_RATE_WINDOW}]))'))
    return entries, rate
