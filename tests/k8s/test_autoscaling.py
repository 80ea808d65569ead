"""The autoscaling timer under a real kopf operator: Prometheus (a loopback server speaking the
instant-query API) drives spec.replicas through the scale subresource; an unreachable
Prometheus holds the size and says so in the ScalingActive condition."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from tests.aiohttp_server import serving
from tests.k8s.conftest import Cluster, OperatorStarter, condition, eventually

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(60)]


@pytest_asyncio.fixture()
async def busy_prometheus() -> AsyncIterator[str]:
    """Two engines of llama-8b, 8 waiting requests each."""

    async def query(request: web.Request) -> web.Response:
        result = []
        if "vllm:num_requests_waiting" in request.query.get("query", ""):
            result = [{"metric": {"pod": f"llama-8b-5d8f-{i}"}, "value": [0, "8"]}
                      for i in range(2)]
        return web.json_response({"status": "success",
                                  "data": {"resultType": "vector", "result": result}})

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    async with serving(app) as url:
        yield url


def with_prometheus(pool: dict[str, Any], url: str, **auto: Any) -> dict[str, Any]:
    body = copy.deepcopy(pool)
    body["spec"]["autoscaling"].update(prometheusUrl=url, **auto)
    return body


async def test_queue_depth_scales_the_pool(cluster: Cluster, operator: OperatorStarter,
                                           pool_8b: dict[str, Any],
                                           busy_prometheus: str) -> None:
    await operator()
    await cluster.create(with_prometheus(pool_8b, busy_prometheus))
    pool = await eventually(lambda: (cluster.pool("llama-8b") or {}).get("spec", {})
                            .get("replicas") == 4 and cluster.pool("llama-8b"), "scaled to 4")
    await eventually(lambda: cluster.get("apps/v1", "deployments", "llama-8b")["spec"]
                     ["replicas"] == 4, "Deployment at 4")
    active = await eventually(lambda: condition(cluster.pool("llama-8b"), "ScalingActive"),
                              "ScalingActive")
    assert active["status"] == "True", pool


async def test_dry_run_only_recommends(cluster: Cluster, operator: OperatorStarter,
                                       pool_8b: dict[str, Any], busy_prometheus: str) -> None:
    await operator()
    await cluster.create(with_prometheus(pool_8b, busy_prometheus, dryRun=True))
    pool = await eventually(lambda: (cluster.pool("llama-8b") or {}).get("status", {})
                            .get("recommendedReplicas") == 4 and cluster.pool("llama-8b"),
                            "recommendation")
    assert pool["spec"]["replicas"] == 2
    assert (condition(pool, "ScalingActive") or {}).get("reason") == "DryRun"


async def test_unreachable_prometheus_holds_size(cluster: Cluster, operator: OperatorStarter,
                                                 pool_8b: dict[str, Any]) -> None:
    await operator()
    await cluster.create(with_prometheus(pool_8b, "http://127.0.0.1:9"))
    held = await eventually(lambda: condition(cluster.pool("llama-8b"), "ScalingActive"),
                            "ScalingActive")
    assert held["status"] == "False" and held["reason"] == "PrometheusUnavailable"
    assert "holding 2 replicas" in held["message"]
    assert cluster.pool("llama-8b")["spec"]["replicas"] == 2
