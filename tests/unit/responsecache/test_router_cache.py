"""The response cache on the router's request paths, against a loopback engine (an aiohttp
server speaking vLLM's chat API): misses reach the engine and are written, exact and
paraphrased repeats are answered by the router in the form asked for, tenants do not share,
failures and cut streams are not written, budgets do not see hits, and Envoy's ext_proc gets an
ImmediateResponse."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from kvroute_router.app import Router, RouterSettings

from tests.routers import running

pytestmark = pytest.mark.usefixtures("embedder")  # skips without the MiniLM package


class Engine:
    """Answers each chat question with a numbered reply, so tests can tell answers apart."""

    def __init__(self) -> None:
        self.requests = 0
        self.mode = "ok"  # ok | fail | cut | tools (a streamed tool call)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.json()
        text = f"reply {self.requests} to {body['messages'][-1]['content']}"
        usage = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
        if self.mode == "fail":
            return web.json_response({"object": "error", "message": "boom"}, status=500)
        if not body.get("stream"):
            return web.json_response({"id": "x", "object": "chat.completion", "created": 1,
                                      "model": body["model"], "usage": usage, "choices": [{
                                          "index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}]})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        deltas: tuple[tuple[dict[str, Any], str | None], ...] = (
            ({"role": "assistant", "content": ""}, None), ({"content": text}, None),
            ({}, "stop"))
        if self.mode == "tools":  # vLLM's shape: id and name first, arguments in pieces
            deltas = (({"role": "assistant", "content": ""}, None),
                      ({"tool_calls": [{"index": 0, "id": f"call_{self.requests}",
                                        "type": "function", "function": {
                                            "name": "get_weather", "arguments": ""}}]}, None),
                      ({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
                       None),
                      ({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
                       None),
                      ({}, "tool_calls"))
        for delta, finish in deltas:
            await response.write(b"data: " + json.dumps({
                "id": "x", "object": "chat.completion.chunk", "created": 1,
                "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).encode()
                + b"\n\n")
            if self.mode == "cut":
                raise ConnectionResetError("engine died mid-stream")
        await response.write(b"data: " + json.dumps({"id": "x", "choices": [],
                                                     "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response


@contextlib.asynccontextmanager
async def cache_router(tmp_path: Path, engine: Engine, *, policy: dict[str, Any] | None = None,
                       tier: dict[str, Any] | None = None
                       ) -> AsyncIterator[tuple[Router, str]]:
    docs = [
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
         "metadata": {"name": "engines"},
         "spec": {"mode": "External", "model": {"name": "engine-model"},
                  "resources": {"gpus": 0},
                  "endpoints": [{"name": "e0", "address": f"127.0.0.1:{engine.port}"}]}},
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "CacheTier",
         "metadata": {"name": "answers"},
         "spec": {"response": {"backend": "memory", "similarityThreshold": 0.8,
                               **(tier or {})}}},
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
         "metadata": {"name": "faq"},
         "spec": {"match": {"model": "faq"}, "pools": [{"name": "engines"}],
                  "scoring": {"scorers": [{"type": "running-requests"}]},
                  "responseCache": {"cacheTierRef": {"name": "answers"}},
                  **(policy or {})}},
    ]
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump_all(docs))
    async with running(RouterSettings(config_paths=[config], host="127.0.0.1", http_port=0,
                                      ext_proc_port=0, grpc_port=None, metrics_port=None,
                                      kv_events=False, trust_tenant_header=True,
                                      # behind the chart's Envoy, which strips clients' copies
                                      ext_proc_trust_gateway_headers=True,
                                      scrape_interval_s=0.05)) as started:
        await asyncio.wait_for(started[0].response_cache.warm_up(), 300)
        yield started


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    fake = Engine()
    await fake.start()
    yield fake
    assert fake.runner is not None
    await fake.runner.cleanup()


def ask(question: str, **extra: Any) -> dict[str, Any]:
    return {"model": "faq", "temperature": 0,
            "messages": [{"role": "user", "content": question}], **extra}


async def post(s: aiohttp.ClientSession, url: str, body: dict[str, Any], tenant: str = "a"
               ) -> tuple[int, str | None, bytes]:
    async with s.post(f"{url}/v1/chat/completions", json=body,
                      headers={"x-kvroute-tenant": tenant}) as resp:
        raw = await resp.read()
        return resp.status, resp.headers.get("x-kvroute-cache"), raw


def content(raw: bytes) -> str:
    if raw.startswith(b"data:"):
        events = [json.loads(line[6:]) for line in raw.decode().split("\n")
                  if line.startswith("data: {")]
        return "".join(c["choices"][0]["delta"].get("content", "")
                       for c in events if c["choices"])
    return str(json.loads(raw)["choices"][0]["message"]["content"])


async def test_exact_and_paraphrased_hits_in_the_form_asked_within_the_tenant(
        tmp_path: Path, engine: Engine) -> None:
    async with cache_router(tmp_path, engine) as (router, url), aiohttp.ClientSession() as s:
        status, header, raw = await post(s, url, ask("What is the capital of France?",
                                                     stream=True))
        assert (status, header) == (200, "miss") and raw.endswith(b"data: [DONE]\n\n")
        first = content(raw)
        await router.response_cache.drain()

        status, header, raw = await post(s, url, ask("What is the capital of France?"))
        assert (status, header, content(raw)) == (200, "exact", first)  # JSON from a stream
        assert json.loads(raw)["usage"]["completion_tokens"] == 4

        status, header, raw = await post(s, url, ask("Which city is the capital of France?",
                                                     stream=True,
                                                     stream_options={"include_usage": True}))
        assert (status, header, content(raw)) == (200, "semantic", first)
        assert b'"usage"' in raw and raw.endswith(b"data: [DONE]\n\n")
        assert engine.requests == 1

        status, header, raw = await post(s, url, ask("Which city is the capital of France?"),
                                         tenant="b")
        assert header == "miss" and content(raw) != first  # tenants do not share
        status, header, _ = await post(s, url, ask("How do I bake sourdough bread?"))
        assert header == "miss"
        assert engine.requests == 3
        registry = router.metrics.registry
        assert registry.get_sample_value("kvroute_response_cache_hits_total", {
            "policy": "faq", "tenant": "a", "match": "semantic"}) == 1
        assert registry.get_sample_value("kvroute_response_cache_hit_tokens_total", {
            "policy": "faq", "tenant": "a", "kind": "completion"}) == 8


async def test_sampling_requests_bypass_unless_allowed(tmp_path: Path, engine: Engine) -> None:
    async with cache_router(tmp_path, engine) as (router, url), aiohttp.ClientSession() as s:
        for _ in range(2):
            _, header, _ = await post(s, url, ask("Tell me a joke", temperature=0.9))
            await router.response_cache.drain()
            assert header == "miss"
        assert engine.requests == 2
    async with cache_router(tmp_path, engine, policy={"responseCache": {
            "cacheTierRef": {"name": "answers"}, "allowSampling": True}}) as (router, url), \
            aiohttp.ClientSession() as s:
        await post(s, url, ask("Tell me a joke", temperature=0.9))
        await router.response_cache.drain()
        _, header, _ = await post(s, url, ask("Tell me a joke", temperature=0.9))
        assert header == "exact" and engine.requests == 3


async def test_errors_and_cut_streams_are_not_written(tmp_path: Path, engine: Engine) -> None:
    async with cache_router(tmp_path, engine) as (router, url), aiohttp.ClientSession() as s:
        engine.mode = "fail"
        status, _, _ = await post(s, url, ask("What is the capital of Spain?"))
        assert status == 500
        engine.mode = "cut"
        with contextlib.suppress(aiohttp.ClientPayloadError):
            await post(s, url, ask("What is the capital of Spain?", stream=True))
        await router.response_cache.drain()
        engine.mode = "ok"
        _, header, _ = await post(s, url, ask("What is the capital of Spain?"))
        assert header == "miss"
        assert router.metrics.registry.get_sample_value(
            "kvroute_response_cache_writes_total",
            {"cache_tier": "default/answers", "result": "rejected"}) == 1  # the cut stream


async def test_threshold_one_means_exact_only_and_ttl_expires(tmp_path: Path,
                                                              engine: Engine) -> None:
    async with cache_router(tmp_path, engine, policy={"responseCache": {
            "cacheTierRef": {"name": "answers"}, "similarityThreshold": 1, "ttlSeconds": 1}}
                            ) as (router, url), aiohttp.ClientSession() as s:
        await post(s, url, ask("What is the capital of Italy?"))
        await router.response_cache.drain()
        _, header, _ = await post(s, url, ask("Which city is the capital of Italy?"))
        assert header == "miss"
        router.response_cache.clock = lambda: 1e12  # far in the future: every entry expired
        for tier in router.response_cache._tiers.values():
            tier.store.clock = router.response_cache.clock  # type: ignore[union-attr]
        _, header, _ = await post(s, url, ask("What is the capital of Italy?"))
        assert header == "miss"


async def test_an_exhausted_budget_still_serves_cache_hits(tmp_path: Path,
                                                           engine: Engine) -> None:
    async with cache_router(tmp_path, engine, policy={"budgets": [
            {"name": "tiny", "requestsPerMinute": 1}]}) as (router, url), \
            aiohttp.ClientSession() as s:
        status, header, _ = await post(s, url, ask("What is the capital of Peru?"))
        assert (status, header) == (200, "miss")
        await router.response_cache.drain()
        status, header, _ = await post(s, url, ask("What is the capital city of Peru?"))
        assert (status, header) == (200, "semantic")
        status, _, _ = await post(s, url, ask("Why is the sky blue?"))
        assert status == 429  # the budget is spent: only the engine path is refused
        assert engine.requests == 1


async def test_ext_proc_answers_a_hit_with_an_immediate_response(tmp_path: Path,
                                                                 engine: Engine) -> None:
    async with cache_router(tmp_path, engine) as (router, url), aiohttp.ClientSession() as s:
        await post(s, url, ask("What is the capital of Chile?"))
        await router.response_cache.drain()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.ports['ext_proc']}") as ch:
            process = ch.stream_stream(
                "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                request_serializer=ep.ProcessingRequest.SerializeToString,
                response_deserializer=ep.ProcessingResponse.FromString)
            body = json.dumps(ask("Which city is the capital of Chile?", stream=True)).encode()
            messages = [
                ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(
                    headers=[base_pb2.HeaderValue(key=":path", raw_value=b"/v1/chat/completions"),
                             base_pb2.HeaderValue(key="x-kvroute-tenant", raw_value=b"a")]))),
                ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))]
            replies = [r async for r in process(iter(messages), timeout=60)]
        immediate = replies[-1].immediate_response
        assert immediate.status.code == 200
        headers = {h.header.key: h.header.raw_value.decode()
                   for h in immediate.headers.set_headers}
        assert headers["x-kvroute-cache"] == "semantic"
        assert headers["content-type"] == "text/event-stream"
        assert content(immediate.body).startswith("reply 1 to What is the capital of Chile?")
        assert engine.requests == 1


def tool_calls(raw: bytes) -> list[dict[str, Any]]:
    """The tool calls a client assembles from a stream (by index, arguments concatenated) or
    reads from a JSON answer."""
    if not raw.startswith(b"data:"):
        return list(json.loads(raw)["choices"][0]["message"]["tool_calls"])
    calls: dict[int, dict[str, Any]] = {}
    for line in raw.decode().split("\n"):
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[6:])
        for choice in event["choices"]:
            for delta in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(delta["index"], {"function": {"arguments": ""}})
                for field in ("id", "type"):
                    if field in delta:
                        call[field] = delta[field]
                function = delta.get("function") or {}
                if "name" in function:
                    call["function"]["name"] = function["name"]
                call["function"]["arguments"] += function.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


async def test_a_streamed_tool_call_is_cached_and_replayed_with_the_same_calls(
        tmp_path: Path, engine: Engine) -> None:
    engine.mode = "tools"
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}}}}}]
    question = ask("What is the weather in Paris?", tools=tools, stream=True)
    async with cache_router(tmp_path, engine) as (router, url), aiohttp.ClientSession() as s:
        status, header, raw = await post(s, url, question)
        assert (status, header) == (200, "miss") and raw.endswith(b"data: [DONE]\n\n")
        expected = [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]
        assert tool_calls(raw) == expected
        await router.response_cache.drain()

        status, header, raw = await post(s, url, question)
        assert (status, header) == (200, "exact") and raw.endswith(b"data: [DONE]\n\n")
        assert tool_calls(raw) == expected
        finishes = [json.loads(line[6:])["choices"][0]["finish_reason"]
                    for line in raw.decode().split("\n")
                    if line.startswith("data: {") and json.loads(line[6:])["choices"]]
        assert finishes[-1] == "tool_calls"
        status, header, raw = await post(s, url, {**question, "stream": False})
        assert (status, header) == (200, "exact")
        assert tool_calls(raw) == expected
        assert json.loads(raw)["choices"][0]["message"]["content"] is None
        assert engine.requests == 1
