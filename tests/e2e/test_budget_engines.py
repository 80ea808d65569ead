"""Budgets end to end against real vLLM-CPU engines, as two pools of different cost: engine 0
is the expensive ``strong`` pool, engine 1 the cheap ``weak`` pool (both External, static
endpoints), and one router config with budgeted RoutePolicies.

Through the proxy: a USD budget answers 429 with ``Retry-After`` and an OpenAI error naming
the budget; a spoofed tenant header does not reach another tenant's budget; an edit of the
config file applies live; ``onExhausted: Downgrade`` routes to the cheap pool — by the batch
stage's pacing (two primaries) and by the ledger's downgrade step once the budget cannot pay
for the strong pool (strong primary, weak fallback), checked on the engine that served it;
spend is settled with the engine's real usage; the budget metrics are on both ``/metrics``.
Through ext_proc over a real gRPC channel with Envoy's messages: ``ImmediateResponse`` 429. A
``maxConcurrency`` budget holds under a bounded burst. Every request has a timeout; no timing
thresholds."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from kvroute_cli.localengines import LocalEngineFleet
from kvroute_router.app import Router, RouterSettings
from kvroute_router.director import Decision
from kvroute_router.framework.endpoint import Endpoint
from prometheus_client.parser import text_string_to_metric_families

from tests.routers import http_url as url_of
from tests.routers import running

pytestmark = pytest.mark.e2e

TIMEOUT = aiohttp.ClientTimeout(total=180)
# USD per million tokens: a ~60-token request costs ~0.12 USD on strong, ~0.0012 on weak.
STRONG_USD_PER_M = 2000.0
WEAK_USD_PER_M = 20.0


def _pool(name: str, address: str, model: str, usd_per_m: float, tier: str) -> dict[str, Any]:
    return {"apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": name},
            "spec": {"mode": "External", "model": {"name": model}, "resources": {"gpus": 0},
                     "engine": {"blockSize": 32},
                     "cost": {"perMillionInputTokensUSD": usd_per_m,
                              "perMillionOutputTokensUSD": usd_per_m},
                     "quality": {"tier": tier},
                     "endpoints": [{"name": f"{name}-0", "address": address}]}}


def _policy(name: str, pools: list[str], budgets: list[dict[str, Any]],
            **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
            "metadata": {"name": name},
            "spec": {"match": {"model": name}, "pools": [{"name": p} for p in pools],
                     "budgets": budgets, "retries": {"maxAttempts": 1},
                     "requestTimeoutSeconds": 120, **spec}}


def config_docs(fleet: LocalEngineFleet, strict_usd: float = 0.3) -> list[dict[str, Any]]:
    strong, weak = (e.address for e in fleet.engines[:2])
    # One primary (strong), so no batch stage: the ledger downgrades to the weak fallback once
    # the USD budget cannot pay for another strong request (~0.1-0.2 USD reserved each).
    ledgered = _policy("ledgered", ["strong", "weak"], [
        {"name": "ledgered", "usd": 0.2, "window": "1h", "onExhausted": "Downgrade"}])
    ledgered["spec"]["pools"][1]["role"] = "fallback"
    return [
        _pool("strong", strong, fleet.model_name, STRONG_USD_PER_M, "strong"),
        _pool("weak", weak, fleet.model_name, WEAK_USD_PER_M, "weak"),
        _policy("strict", ["strong"], [{"name": "team", "tenant": "*", "usd": strict_usd,
                                        "window": "1m"}]),
        _policy("tiered", ["strong", "weak"],
                [{"name": "tiered", "usd": 0.3, "window": "1m", "onExhausted": "Downgrade"}],
                batching={"enabled": False}),
        _policy("lanes", ["weak"], [{"name": "lanes", "maxConcurrency": 2}]),
        ledgered,
    ]


def write_config(config: Path, docs: list[dict[str, Any]]) -> None:
    config.write_text(yaml.safe_dump_all(docs))


@contextlib.asynccontextmanager
async def budget_router(config: Path, docs: list[dict[str, Any]], *,
                        ext_proc_trust_gateway_headers: bool = False) -> AsyncIterator[Router]:
    write_config(config, docs)
    settings = RouterSettings(config_paths=[config], host="127.0.0.1", http_port=0,
                              ext_proc_port=0, grpc_port=None, metrics_port=0,
                              kv_events=False, config_poll_interval_s=0.2,
                              ext_proc_trust_gateway_headers=ext_proc_trust_gateway_headers)
    async with running(settings) as (router, _):
        yield router


async def complete(s: aiohttp.ClientSession, router: Router, model: str, prompt: str,
                   max_tokens: int = 4, headers: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, str], Any]:
    async with s.post(f"{url_of(router)}/v1/completions", headers=headers or {}, json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens,
            "ignore_eos": True}) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def sample(router: Router, name: str, labels: dict[str, str],
                 ready: Callable[[float | None], bool] = lambda v: v is not None
                 ) -> float | None:
    """A metric sample once settled (settles run just after the response; bounded wait)."""
    value = None
    for _ in range(50):
        value = router.metrics.registry.get_sample_value(name, labels)
        if ready(value):
            return value
        await asyncio.sleep(0.05)
    return value


async def test_proxy_budget_429_spoofing_live_edit_and_metrics(
        tmp_path: Path, engine_fleet: LocalEngineFleet, unique_prompt: str) -> None:
    config = tmp_path / "router.yaml"
    prompt = unique_prompt + "a budgeted prompt of some length"
    async with budget_router(config, config_docs(engine_fleet)) as router, \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        ok = [await complete(s, router, "strict", prompt + str(i)) for i in range(2)]
        assert [status for status, _, _ in ok] == [200, 200]
        assert all(h["x-kvroute-pool"] == "strong" for _, h, _ in ok)
        usage = [body["usage"] for _, _, body in ok]

        status, headers, body = await complete(s, router, "strict", prompt + "3")
        assert status == 429, body
        assert int(headers["Retry-After"]) >= 1
        error = body["error"]
        assert error["code"] == "budget_exhausted" and error["type"] == "rate_limit_exceeded"
        assert error["param"] == "budgets[team].usd"
        assert "budget 'team'" in error["message"] and "'anonymous'" in error["message"]

        # A client-sent tenant header is dropped by the proxy: still the anonymous budget.
        status, _, body = await complete(s, router, "strict", prompt + "4",
                                         headers={"x-kvroute-tenant": "someone-else"})
        assert status == 429 and "'anonymous'" in body["error"]["message"]

        # Settled with the engine's real usage (prompt and completion tokens, strong price).
        labels = {"policy_namespace": "default", "policy": "strict", "budget": "team",
                  "tenant": "anonymous"}
        spent = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage) \
            * STRONG_USD_PER_M / 1e6
        assert await sample(router, "kvroute_budget_spend_usd_total", labels) == \
            pytest.approx(spent)
        assert await sample(router, "kvroute_budget_tokens_total",
                            {**labels, "kind": "output"}, lambda v: v == 8) == 8
        assert await sample(router, "kvroute_budget_requests_total",
                            {**labels, "outcome": "rejected"}) == 2

        # Both /metrics endpoints carry the budget metrics the operator reads.
        for url in (f"{url_of(router)}/metrics",
                    f"http://127.0.0.1:{router.ports['metrics']}/metrics"):
            async with s.get(url) as resp:
                text = await resp.text()
            samples = {(sample.name, tuple(sorted(sample.labels.items())))
                       for family in text_string_to_metric_families(text)
                       for sample in family.samples}
            assert ("kvroute_budget_spend_usd_total", tuple(sorted(labels.items()))) in samples
            assert ("kvroute_budget_tokens_total",
                    tuple(sorted({**labels, "kind": "prompt"}.items()))) in samples
            assert any(name == "kvroute_requests_total" for name, _ in samples)

        # Raise the limit by rewriting the embedded config: applies without a restart.
        write_config(config, config_docs(engine_fleet, strict_usd=50.0))
        for attempt in range(40):  # the file is polled every 0.2 s; bounded
            status, _, body = await complete(s, router, "strict", prompt + f"edit {attempt}")
            if status == 200:
                break
            assert status == 429
            await asyncio.sleep(0.25)
        assert status == 200


async def test_downgrade_routes_to_the_cheap_pool(
        tmp_path: Path, engine_fleet: LocalEngineFleet, unique_prompt: str) -> None:
    async with budget_router(tmp_path / "router.yaml", config_docs(engine_fleet)) as router, \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        served: list[str] = []
        for i in range(6):
            status, headers, body = await complete(s, router, "tiered",
                                                   f"{unique_prompt} tiered question {i}")
            assert status == 200, body
            served.append(headers["x-kvroute-pool"])
        assert "strong" in served and served[-1] == "weak"
        labels = {"policy_namespace": "default", "policy": "tiered", "budget": "tiered",
                  "tenant": "anonymous"}
        spend = await sample(router, "kvroute_budget_spend_usd_total", labels)
        assert spend is not None and spend <= 0.3
        # A stream whose client does not ask for usage is still settled with the engine's own
        # count: the proxy asks for the usage event and drops it from what the client sees
        # (counting events undercounts: vLLM merges queued tokens into one event under load).
        before = await sample(router, "kvroute_budget_tokens_total", {**labels, "kind": "output"})
        assert before is not None
        async with s.post(f"{url_of(router)}/v1/completions", json={
                "model": "tiered", "prompt": unique_prompt + "stream me", "max_tokens": 5,
                "ignore_eos": True, "stream": True}) as resp:
            assert resp.status == 200
            streamed = await resp.read()
        assert b'"usage"' not in streamed and streamed.rstrip().endswith(b"data: [DONE]")
        after = await sample(router, "kvroute_budget_tokens_total",
                             {**labels, "kind": "output"}, lambda v: v != before)
        assert after is not None
        assert after - before == 5


async def engine_requests(s: aiohttp.ClientSession, address: str) -> float:
    """Requests an engine has finished, from its own ``/metrics``."""
    async with s.get(f"http://{address}/metrics") as resp:
        text = await resp.text()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "vllm:request_success_total")


async def test_ledger_downgrade_lands_on_the_cheapest_pool(
        tmp_path: Path, engine_fleet: LocalEngineFleet, unique_prompt: str) -> None:
    """Not the batch stage: the policy has one primary (strong), so each request reserves the
    strong price; once the USD budget cannot pay for it, the ledger's Downgrade step reserves
    the weak fallback and the request is restricted to it. The weak engine serves it."""
    strong, weak = (e.address for e in engine_fleet.engines[:2])
    async with budget_router(tmp_path / "router.yaml", config_docs(engine_fleet)) as router, \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        before = {a: await engine_requests(s, a) for a in (strong, weak)}
        served: list[tuple[str, str]] = []
        for i in range(8):  # bounded: the budget pays for one or two strong requests
            status, headers, body = await complete(s, router, "ledgered",
                                                   f"{unique_prompt} ledgered question {i}")
            assert status == 200, body
            served.append((headers["x-kvroute-pool"], headers["x-kvroute-endpoint"]))
            if served[-1][0] == "weak" and len([p for p, _ in served if p == "weak"]) == 3:
                break
        pools = [p for p, _ in served]
        print(f"ledgered: served by {pools}")
        assert pools[0] == "strong" and "weak" in pools
        first_weak = pools.index("weak")
        assert pools[first_weak:] == ["weak"] * (len(pools) - first_weak)  # spend only grows
        assert all(ep == (strong if p == "strong" else weak) for p, ep in served)
        labels = {"policy_namespace": "default", "policy": "ledgered", "budget": "ledgered",
                  "tenant": "anonymous"}
        downgraded = len(pools) - first_weak
        assert await sample(router, "kvroute_budget_requests_total",
                            {**labels, "outcome": "downgraded"}) == downgraded
        assert await sample(router, "kvroute_budget_requests_total",
                            {**labels, "outcome": "admitted"}) == first_weak
        exhausted = await sample(router, "kvroute_budget_exhausted_total",
                                 {**labels, "limit": "usd"})
        assert exhausted is not None and exhausted >= downgraded
        spend = await sample(router, "kvroute_budget_spend_usd_total", labels)
        assert spend is not None and spend <= 0.2
        # The engines agree: the weak one finished the downgraded requests.
        after = {a: before[a] for a in (strong, weak)}
        for _ in range(50):  # the engine's counters follow the response; bounded
            after = {a: await engine_requests(s, a) for a in (strong, weak)}
            if after[weak] - before[weak] >= downgraded:
                break
            await asyncio.sleep(0.1)
        assert after[weak] - before[weak] == downgraded
        assert after[strong] - before[strong] == first_weak
        assert await sample(router, "kvroute_budget_in_flight", labels,
                            lambda v: v == 0) == 0


async def test_ext_proc_answers_429_when_the_budget_is_spent(
        tmp_path: Path, engine_fleet: LocalEngineFleet, unique_prompt: str) -> None:
    # The gateway vouches for the tenant header (it strips clients' copies): docs/security.md.
    # Without the flag ext_proc ignores it (tests/e2e/test_security_loopback.py).
    async with budget_router(tmp_path / "router.yaml", config_docs(engine_fleet),
                             ext_proc_trust_gateway_headers=True) as router, \
            grpc.aio.insecure_channel(f"127.0.0.1:{router.ports['ext_proc']}") as channel, \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        process = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=ep.ProcessingRequest.SerializeToString,
            response_deserializer=ep.ProcessingResponse.FromString)

        async def through_envoy(tenant: str, i: int) -> tuple[str, Any]:
            """What Envoy does: headers, body → route; forward to the target; response
            headers and body back to ext_proc. Returns ("routed", usage) or ("immediate",
            ImmediateResponse)."""
            body = json.dumps({"model": "strict", "max_tokens": 4, "ignore_eos": True,
                               "prompt": f"{unique_prompt} via envoy {tenant} {i}"}).encode()
            outbox: asyncio.Queue[Any] = asyncio.Queue()
            await outbox.put(ep.ProcessingRequest(request_headers=ep.HttpHeaders(
                headers=base_pb2.HeaderMap(headers=[
                    base_pb2.HeaderValue(key=":path", raw_value=b"/v1/completions"),
                    base_pb2.HeaderValue(key=":method", raw_value=b"POST"),
                    base_pb2.HeaderValue(key="x-kvroute-tenant", raw_value=tenant.encode())]))))
            await outbox.put(ep.ProcessingRequest(request_body=ep.HttpBody(
                body=body, end_of_stream=True)))

            async def messages() -> AsyncIterator[Any]:
                while (message := await outbox.get()) is not None:
                    yield message

            call = process(messages(), timeout=60)
            await call.read()  # headers response
            answer = await call.read()
            if answer.HasField("immediate_response"):
                await outbox.put(None)
                return "immediate", answer.immediate_response
            common = answer.request_body.response
            target = next(h.header.raw_value.decode()
                          for h in common.header_mutation.set_headers
                          if h.header.key == "x-gateway-destination-endpoint")
            forwarded = common.body_mutation.body or body
            async with s.post(f"http://{target}/v1/completions", data=forwarded,
                              headers={"content-type": "application/json"}) as resp:
                status, raw = resp.status, await resp.read()
            await outbox.put(ep.ProcessingRequest(response_headers=ep.HttpHeaders(
                headers=base_pb2.HeaderMap(headers=[
                    base_pb2.HeaderValue(key=":status", raw_value=str(status).encode())]))))
            await call.read()
            await outbox.put(ep.ProcessingRequest(response_body=ep.HttpBody(
                body=raw, end_of_stream=True)))
            await call.read()
            await outbox.put(None)
            assert status == 200
            return "routed", json.loads(raw)["usage"]

        assert [(await through_envoy("ext-a", i))[0] for i in range(2)] == ["routed"] * 2
        kind, immediate = await through_envoy("ext-a", 2)
        assert kind == "immediate"
        assert immediate.status.code == 429
        headers = {h.header.key: h.header.raw_value.decode()
                   for h in immediate.headers.set_headers}
        assert int(headers["retry-after"]) >= 1
        error = json.loads(immediate.body)["error"]
        assert error["code"] == "budget_exhausted" and "budget 'team'" in error["message"]
        assert "'ext-a'" in error["message"]  # the vouching gateway's tenant header
        # Another tenant (set by the gateway) has its own budget.
        assert (await through_envoy("ext-b", 0))[0] == "routed"
        labels = {"policy_namespace": "default", "policy": "strict", "budget": "team",
                  "tenant": "ext-a"}
        assert await sample(router, "kvroute_budget_tokens_total", {**labels, "kind": "output"},
                            lambda v: v == 8) == 8  # the engine's usage, seen by ext_proc


async def test_max_concurrency_holds_under_a_burst(
        tmp_path: Path, engine_fleet: LocalEngineFleet, unique_prompt: str) -> None:
    async with budget_router(tmp_path / "router.yaml", config_docs(engine_fleet)) as router, \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        peak = [0]
        dispatch = router.director.dispatch

        def counting_dispatch(decision: Decision, endpoint: Endpoint) -> None:
            dispatch(decision, endpoint)
            if decision.policy_name == "lanes":
                peak[0] = max(peak[0], endpoint.in_flight)

        router.director.dispatch = counting_dispatch  # type: ignore[method-assign]
        results = await asyncio.gather(*(
            complete(s, router, "lanes", f"{unique_prompt} burst {i}", max_tokens=24)
            for i in range(8)))
        statuses = [status for status, _, _ in results]
        assert set(statuses) <= {200, 429}
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1
        assert 1 <= peak[0] <= 2
        for status, headers, body in results:
            if status == 429:
                assert body["error"]["param"] == "budgets[lanes].maxConcurrency"
                assert int(headers["Retry-After"]) >= 1
        # The slots are free again once the burst is over.
        status, _, _ = await complete(s, router, "lanes", f"{unique_prompt} after")
        assert status == 200
