"""Issue 14 walk-arounds, tried as a hostile tenant would against a real router (proxy,
ext_proc and gRPC servers) over loopback fake engines: each must be closed (docs/security.md).
Not marked e2e: no vLLM needed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kvroute_router.app import Router, RouterSettings

from tests.loopback.test_router_loopback import FakeEngine
from tests.routers import running

pytestmark = pytest.mark.loopback

TIMEOUT = aiohttp.ClientTimeout(total=60)


def pool(name: str, address: str, model: str = "fake-model", namespace: str = "default",
         **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"mode": "External", "model": {"name": model}, "resources": {"gpus": 0},
                     "endpoints": [{"name": f"{name}-0", "address": address}], **spec}}


def policy(name: str, pools: list[str], model: str = "chat", namespace: str = "default",
           **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"match": {"model": model}, "pools": [{"name": p} for p in pools], **spec}}


ONE_PER_MINUTE = [{"name": "tight", "requestsPerMinute": 1}]


@contextlib.asynccontextmanager
async def running_router(tmp_path: Path, docs: list[dict[str, Any]], **settings: Any
                         ) -> AsyncIterator[tuple[Router, str]]:
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump_all(docs))
    async with running(RouterSettings(**{
           "config_paths": [config], "host": "127.0.0.1", "http_port": 0, "ext_proc_port": None,
           "grpc_port": None, "metrics_port": None, "scrape_interval_s": 0.05,
           "config_poll_interval_s": 0.05, "kv_events": False, "quality_embedding": "hashed",
           **settings})) as started:
        yield started


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    fake = FakeEngine()
    await fake.start()
    yield fake
    fake.release.set()
    await fake.stop()


async def post(s: aiohttp.ClientSession, url: str, model: str,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with s.post(f"{url}/v1/completions", headers=headers or {},
                      json={"model": model, "prompt": "hi", "max_tokens": 4}) as resp:
        return resp.status, await resp.json()


# ---- item 1: a pool a policy targets is reachable only through a policy -------------------------

async def test_the_served_name_of_a_policy_pool_does_not_skip_the_budget(
        tmp_path: Path, engine: FakeEngine) -> None:
    docs = [pool("fake", engine.address), policy("chat", ["fake"], budgets=ONE_PER_MINUTE)]
    async with running_router(tmp_path, docs) as (_, url), \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(f"{url}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["chat"]
        assert (await post(s, url, "chat"))[0] == 200
        assert (await post(s, url, "chat"))[0] == 429
        status, body = await post(s, url, "fake-model")  # the walk-around: the served name
        assert status == 404, body
        assert body["error"]["code"] == "model_not_found"
        assert "chat" in body["error"]["message"]
    assert engine.requests == 1


async def test_a_pool_that_opts_in_is_reachable_directly_through_a_default_policy(
        tmp_path: Path, engine: FakeEngine) -> None:
    docs = [pool("fake", engine.address, directAccess=True),
            policy("chat", ["fake"], budgets=ONE_PER_MINUTE)]
    async with running_router(tmp_path, docs) as (router, url), \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(f"{url}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["chat", "fake-model"]
        assert (await post(s, url, "fake-model"))[0] == 200
        assert (await post(s, url, "fake-model"))[0] == 200  # the default policy: no budgets
        requests = router.metrics.registry.get_sample_value(
            "kvroute_requests_total", {"policy": "implicit-fake", "pool": "fake",
                                       "endpoint": "fake-0", "status": "200"})
        assert requests == 2


async def test_a_directly_reached_name_is_admitted_like_any_policy(
        tmp_path: Path, engine: FakeEngine) -> None:
    """The default policy's limits apply: with every endpoint saturated the request queues in
    admission control instead of going straight to the engine (it used to skip the hook)."""
    engine.kv_usage = 1.0
    docs = [pool("fake", engine.address)]  # no policy targets it: reachable directly
    async with running_router(tmp_path, docs) as (router, url), \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for _ in range(200):  # bounded: until the first scrape saw the saturated engine
            if router.datastore.endpoints()[0].metrics is not None:
                break
            await asyncio.sleep(0.05)
        waiting = asyncio.create_task(post(s, url, "fake-model"))
        depth = None
        for _ in range(200):  # bounded wait for the request to reach the queue
            depth = router.metrics.registry.get_sample_value(
                "kvroute_admission_queue_depth",
                {"policy_namespace": "implicit", "policy": "fake-model"})
            if depth == 1 or waiting.done():
                break
            await asyncio.sleep(0.05)
        assert depth == 1 and engine.requests == 0
        engine.kv_usage = 0.1  # capacity is back: released (within the 30 s queue timeout)
        status, body = await waiting
        assert status == 200, body
        assert router.metrics.registry.get_sample_value(  # counted (the bench reads it too)
            "kvroute_admission_released_total",
            {"policy_namespace": "implicit", "policy": "fake-model", "order": "arrival"}) == 1
    assert engine.requests == 1


# ---- item 6: resolution scoped to namespaces, conflicts refused --------------------------------

async def test_a_policy_in_another_namespace_cannot_capture_a_model(
        tmp_path: Path, engine: FakeEngine) -> None:
    """``aaa/grab`` claims ``chat`` next to ``team/chat``: never resolved by name order."""
    docs = [pool("fake", engine.address, namespace="team"),
            policy("chat", ["fake"], namespace="team", budgets=ONE_PER_MINUTE),
            pool("sink", engine.address, model="sink-model", namespace="aaa"),
            policy("grab", ["sink"], namespace="aaa"),
            pool("other", engine.address, model="other-model", namespace="aaa")]
    async with running_router(tmp_path, docs, trusted_proxy_cidrs=["127.0.0.1/32"]) \
            as (_, url), aiohttp.ClientSession(timeout=TIMEOUT) as s:
        status, body = await post(s, url, "chat")
        assert status == 409, body
        assert body["error"]["code"] == "policy_conflict"
        assert body["error"]["param"] == "model"
        assert "aaa/grab" in body["error"]["message"]
        assert "team/chat" in body["error"]["message"]
        # The trusted hop scopes the request to its namespace: the team's policy and budget.
        scoped = {"x-kvroute-namespace": "team"}
        async with s.get(f"{url}/v1/models", headers=scoped) as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["chat"]
        async with s.get(f"{url}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["chat", "other-model"]
        assert (await post(s, url, "chat", scoped))[0] == 200
        assert (await post(s, url, "chat", scoped))[0] == 429
    assert engine.models_seen == ["fake-model"]


async def test_a_scope_header_from_an_untrusted_client_is_ignored(
        tmp_path: Path, engine: FakeEngine) -> None:
    docs = [pool("fake", engine.address, namespace="team"),
            policy("chat", ["fake"], namespace="team"),
            pool("sink", engine.address, model="sink-model", namespace="aaa"),
            policy("grab", ["sink"], namespace="aaa")]
    async with running_router(tmp_path, docs) as (_, url), \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        status, body = await post(s, url, "chat", {"x-kvroute-namespace": "aaa"})
        assert status == 409, body
    assert engine.requests == 0


async def test_a_header_match_sent_by_the_client_does_not_select_a_policy(
        tmp_path: Path, engine: FakeEngine) -> None:
    """A policy matching ``content-type`` would beat the budgeted one; clients' match headers
    are not believed (gated), so the budgeted policy applies."""
    docs = [pool("fake", engine.address),
            policy("chat", ["fake"], budgets=ONE_PER_MINUTE),
            pool("free", engine.address, model="free-model"),
            {**policy("free", ["free"]), "spec": {
                "match": {"model": "chat", "headers": [{"name": "x-team", "value": "a"}]},
                "pools": [{"name": "free"}]}}]
    async with running_router(tmp_path, docs) as (_, url), \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert (await post(s, url, "chat", {"x-team": "a"}))[0] == 200
        assert (await post(s, url, "chat", {"x-team": "a"}))[0] == 429
    assert engine.models_seen == ["fake-model"]


# ---- items 2 and 9: tenant and priority only from the trusted hop ------------------------------

EACH_ONE_PER_MINUTE = [{"name": "each", "tenant": "*", "requestsPerMinute": 1}]


async def _through_ext_proc(port: int, headers: dict[str, str], model: str = "chat") -> Any:
    """What Envoy sends: request headers, then the whole body; returns the body's answer."""
    import json

    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 4}).encode()
    sent = {":path": "/v1/completions", ":method": "POST", **headers}
    messages = [
        ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                     for k, v in sent.items()]))),
        ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        process = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=ep.ProcessingRequest.SerializeToString,
            response_deserializer=ep.ProcessingResponse.FromString)
        call = process(iter(messages), timeout=30)
        answers = [answer async for answer in call]
    return answers[1]


def _budget_requests(router: Router, tenant: str, outcome: str = "admitted") -> float:
    value = router.metrics.registry.get_sample_value("kvroute_budget_requests_total", {
        "policy_namespace": "default", "policy": "chat", "budget": "each", "tenant": tenant,
        "outcome": outcome})
    return value or 0.0


@pytest.mark.parametrize("trusted", [False, True])
async def test_ext_proc_believes_the_tenant_header_only_when_the_gateway_vouches(
        tmp_path: Path, engine: FakeEngine, trusted: bool) -> None:
    """A forged ``x-kvroute-tenant`` must not bill (and lock out) a victim tenant."""
    docs = [pool("fake", engine.address), policy("chat", ["fake"], budgets=EACH_ONE_PER_MINUTE)]
    vouched = {"ext_proc_trust_gateway_headers": True} if trusted else {}
    async with running_router(tmp_path, docs, ext_proc_port=0, **vouched) as (router, _):
        port = router.ports["ext_proc"]
        answer = await _through_ext_proc(port, {"x-kvroute-tenant": "victim"})
        assert answer.HasField("request_body"), answer
        billed = "victim" if trusted else "anonymous"
        assert _budget_requests(router, billed) == 1
        assert _budget_requests(router, "victim" if not trusted else "anonymous") == 0


async def test_a_client_cannot_raise_its_own_priority(tmp_path: Path, engine: FakeEngine
                                                      ) -> None:
    """Saturated endpoints shed the sheddable default class at once; a client claiming the
    critical class would queue instead (and, with capacity back, jump the queue)."""
    engine.kv_usage = 1.0
    admission = {"priorityClasses": [{"name": "critical", "priority": 100},
                                     {"name": "batch", "priority": 0, "sheddable": True}],
                 "defaultPriorityClass": "batch", "queueTimeoutMs": 200}
    docs = [pool("fake", engine.address), policy("chat", ["fake"], admission=admission)]
    async with running_router(tmp_path, docs) as (router, url), \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for _ in range(200):  # bounded: until the first scrape saw the saturated engine
            ep = router.datastore.endpoints()[0]
            if ep.metrics is not None:
                break
            await asyncio.sleep(0.05)
        status, body = await post(s, url, "chat", {"x-kvroute-priority": "critical"})
        assert status == 429, body
        assert body["error"]["code"] == "overloaded", body  # shed as batch, not queued
    assert engine.requests == 0


# ---- item 2: the gRPC ports authenticate callers; Pick's tenant is the caller --------------------

def _grpc_calls(channel: Any) -> tuple[Any, Any]:
    from kvroute_router.proto_gen import router_pb2 as pb

    pick = channel.unary_unary("/kvroute.v1.Router/Pick",
                               request_serializer=pb.PickRequest.SerializeToString,
                               response_deserializer=pb.PickResponse.FromString)
    report = channel.unary_unary("/kvroute.v1.Router/Report",
                                 request_serializer=pb.ReportRequest.SerializeToString,
                                 response_deserializer=pb.ReportResponse.FromString)
    return pick, report


def _tokens_dir(tmp_path: Path) -> Path:
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "alice").write_text("alice-secret-token\n")
    (tokens / "bob").write_text("bob-secret-token")
    return tokens


async def test_pick_needs_a_token_and_the_caller_is_the_tenant(
        tmp_path: Path, engine: FakeEngine) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from kvroute_router.proto_gen import router_pb2 as pb

    docs = [pool("fake", engine.address), policy("chat", ["fake"], budgets=EACH_ONE_PER_MINUTE)]
    async with running_router(tmp_path, docs, grpc_port=0,
                              grpc_tokens_dir=_tokens_dir(tmp_path)) as (router, _), \
            grpc.aio.insecure_channel(f"127.0.0.1:{router.ports['grpc']}") as channel:
        pick, report = _grpc_calls(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pick(pb.PickRequest(model="chat", prompt="hi"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pick(pb.PickRequest(model="chat", prompt="hi"), timeout=10,
                       metadata=(("authorization", "Bearer alice-secret-tokeN"),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        alice = (("authorization", "Bearer alice-secret-token"),)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pick(pb.PickRequest(model="chat", prompt="hi", tenant="bob"), timeout=10,
                       metadata=alice)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        picked = await pick(pb.PickRequest(model="chat", prompt="hi",
                                           headers={"x-kvroute-tenant": "bob"}),
                            timeout=10, metadata=alice)
        assert _budget_requests(router, "alice") == 1 and _budget_requests(router, "bob") == 0
        # Only the caller that picked may report the decision.
        bob = (("authorization", "Bearer bob-secret-token"),)
        assert not (await report(pb.ReportRequest(decision_id=picked.decision_id, status=200),
                                 timeout=10, metadata=bob)).accepted
        assert (await report(pb.ReportRequest(decision_id=picked.decision_id, status=200,
                                              completion_tokens=2),
                             timeout=10, metadata=alice)).accepted
        health = health_pb2_grpc.HealthStub(channel)  # never authenticated
        status = await health.Check(health_pb2.HealthCheckRequest(service="kvroute.v1.Router"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_an_anonymous_pick_cannot_choose_its_tenant(
        tmp_path: Path, engine: FakeEngine) -> None:
    import grpc
    from kvroute_router.proto_gen import router_pb2 as pb

    docs = [pool("fake", engine.address), policy("chat", ["fake"], budgets=EACH_ONE_PER_MINUTE)]
    async with running_router(tmp_path, docs, grpc_port=0) as (router, _), \
            grpc.aio.insecure_channel(f"127.0.0.1:{router.ports['grpc']}") as channel:
        pick, _ = _grpc_calls(channel)
        await pick(pb.PickRequest(model="chat", prompt="hi", tenant="victim",
                                  headers={"x-kvroute-tenant": "victim"}), timeout=10)
        assert _budget_requests(router, "victim") == 0
        assert _budget_requests(router, "anonymous") == 1


# ---- item 3: picks that never pay ----------------------------------------------------------------

TOKEN_BUDGET = [{"name": "each", "tenant": "*", "tokensPerMinute": 1_000_000}]


async def _output_tokens(router: Router, tenant: str, want: float) -> float | None:
    value: float | None = None
    for _ in range(100):  # settling runs in a task: bounded wait for it
        value = router.metrics.registry.get_sample_value("kvroute_budget_tokens_total", {
            "policy_namespace": "default", "policy": "chat", "budget": "each",
            "tenant": tenant, "kind": "output"})
        if value == want:
            break
        await asyncio.sleep(0.05)
    return value


@pytest.mark.parametrize("how", ["error-report", "zero-report", "never-reported"])
async def test_an_anonymous_pick_pays_its_reservation(
        tmp_path: Path, engine: FakeEngine, how: str) -> None:
    import grpc
    from kvroute_router.proto_gen import router_pb2 as pb

    docs = [pool("fake", engine.address),
            policy("chat", ["fake"], budgets=TOKEN_BUDGET, requestTimeoutSeconds=1)]
    async with running_router(tmp_path, docs, grpc_port=0) as (router, _), \
            grpc.aio.insecure_channel(f"127.0.0.1:{router.ports['grpc']}") as channel:
        pick, report = _grpc_calls(channel)
        picked = await pick(pb.PickRequest(model="chat", prompt="hi", max_tokens=40),
                            timeout=10)
        if how == "error-report":
            await report(pb.ReportRequest(decision_id=picked.decision_id, status=500),
                         timeout=10)
        elif how == "zero-report":
            await report(pb.ReportRequest(decision_id=picked.decision_id, status=200,
                                          prompt_tokens=0, completion_tokens=0), timeout=10)
        else:
            await asyncio.sleep(1.2)  # past requestTimeoutSeconds; the next Pick expires it
            await pick(pb.PickRequest(model="chat", prompt="again", max_tokens=1), timeout=10)
        assert await _output_tokens(router, "anonymous", 40) == 40


async def test_an_authenticated_callers_reports_are_believed(
        tmp_path: Path, engine: FakeEngine) -> None:
    import grpc
    from kvroute_router.proto_gen import router_pb2 as pb

    docs = [pool("fake", engine.address), policy("chat", ["fake"], budgets=TOKEN_BUDGET)]
    alice = (("authorization", "Bearer alice-secret-token"),)
    async with running_router(tmp_path, docs, grpc_port=0,
                              grpc_tokens_dir=_tokens_dir(tmp_path)) as (router, _), \
            grpc.aio.insecure_channel(f"127.0.0.1:{router.ports['grpc']}") as channel:
        pick, report = _grpc_calls(channel)
        for status, tokens in ((200, 0), (200, 7), (503, 0)):
            picked = await pick(pb.PickRequest(model="chat", prompt="hi", max_tokens=40),
                                timeout=10, metadata=alice)
            await report(pb.ReportRequest(decision_id=picked.decision_id, status=status,
                                          completion_tokens=tokens), timeout=10, metadata=alice)
        # 0 (a believed empty answer) + 7 (reported) + 40 (an error report: the reservation)
        assert await _output_tokens(router, "alice", 47) == 47


async def test_ext_proc_can_require_a_caller_token(tmp_path: Path, engine: FakeEngine) -> None:
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    docs = [pool("fake", engine.address), policy("chat", ["fake"])]
    async with running_router(tmp_path, docs, ext_proc_port=0, ext_proc_require_token=True,
                              grpc_tokens_dir=_tokens_dir(tmp_path)) as (router, _), \
            grpc.aio.insecure_channel(f"127.0.0.1:{router.ports['ext_proc']}") as channel:
        process = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=ep.ProcessingRequest.SerializeToString,
            response_deserializer=ep.ProcessingResponse.FromString)
        call = process(timeout=30)  # refused before any message is read
        assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "--grpc-tokens-dir" in (await call.details() or "")
        call = process(timeout=30, metadata=(("authorization", "Bearer bob-secret-token"),))
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK  # an empty stream, accepted
