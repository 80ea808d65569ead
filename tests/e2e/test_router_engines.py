"""The router in front of real vLLM-CPU engines: streaming through the proxy, prefix affinity
with load spread, an engine that dies routed around, ext_proc and Pick over real channels.
No timing thresholds: assertions are about where requests went and that they completed."""

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
from kvroute_cli.localengines import LocalEngineFleet
from kvroute_router.app import Router, RouterSettings
from kvroute_router.grpcapi.client import RouterClient
from kvroute_router.proto_gen import router_pb2 as pb

from tests.routers import http_url as url_of
from tests.routers import running

pytestmark = pytest.mark.e2e

TIMEOUT = aiohttp.ClientTimeout(total=180)


@contextlib.asynccontextmanager
async def router_for(tmp_path: Path, addresses: list[str], model: str
                     ) -> AsyncIterator[Router]:
    docs = [
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
         "metadata": {"name": "local"},
         "spec": {"mode": "External", "model": {"name": model}, "resources": {"gpus": 0},
                  "engine": {"blockSize": 32},
                  "endpoints": [{"name": f"engine-{i}", "address": a}
                                for i, a in enumerate(addresses)]}},
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy", "metadata": {"name": "chat"},
         "spec": {"match": {"model": "chat"}, "pools": [{"name": "local"}],
                  "retries": {"maxAttempts": 3, "perTryTimeoutMs": 60000},
                  "requestTimeoutSeconds": 120}},
    ]
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump_all(docs))
    settings = RouterSettings(config_paths=[config], host="127.0.0.1", http_port=0,
                              ext_proc_port=0, grpc_port=0, metrics_port=None)
    async with running(settings) as (router, _):
        yield router


async def test_streaming_chat_through_the_proxy(tmp_path: Path, engine_fleet: LocalEngineFleet,
                                                unique_prompt: str) -> None:
    addresses = [e.address for e in engine_fleet.engines]
    async with router_for(tmp_path, addresses, engine_fleet.model_name) as router, \
            aiohttp.ClientSession(timeout=TIMEOUT) as s, \
            s.post(f"{url_of(router)}/v1/chat/completions", json={
                "model": "chat", "stream": True, "max_tokens": 8, "ignore_eos": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": unique_prompt + "hello"}]}) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-kvroute-endpoint"] in addresses
        events = [line async for line in resp.content if line.startswith(b"data:")]
        assert events[-1].strip() == b"data: [DONE]"
        chunks = [json.loads(e[5:]) for e in events[:-1]]
        assert len(chunks) > 2  # streamed, not one blob
        assert chunks[-1]["usage"]["completion_tokens"] == 8


async def test_shared_prefixes_stick_and_distinct_prefixes_spread(
        tmp_path: Path, engine_fleet: LocalEngineFleet, unique_prompt: str) -> None:
    addresses = [e.address for e in engine_fleet.engines]
    system = unique_prompt + "You are a terse assistant for the affinity test. " * 40
    async with router_for(tmp_path, addresses, engine_fleet.model_name) as router, \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        url = f"{url_of(router)}/v1/chat/completions"

        async def chat(system_prompt: str, question: str) -> str:
            async with s.post(url, json={"model": "chat", "max_tokens": 2, "messages": [
                    {"role": "system", "content": system_prompt},
                    {"role": "user", "content": question}]}) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
                return resp.headers["x-kvroute-endpoint"]

        served = [await chat(system, f"question {i}") for i in range(5)]
        assert len(set(served)) == 1
        # Distinct long prefixes sent at once: in-flight load spreads them over both engines.
        distinct = await asyncio.gather(*(
            chat(f"{unique_prompt} distinct {i} " + f"topic {i} " * 300, "go")
            for i in range(6)))
        assert set(distinct) == set(addresses)
        ratio = router.metrics.registry.get_sample_value(
            "kvroute_prefix_match_ratio_sum", {"policy": "chat", "pool": "local"})
        assert ratio is not None and ratio >= 3.5  # requests 2..5 matched their prefix


class DyingEngine:
    """A loopback server that accepts requests and then dies (its socket closes)."""

    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.hits = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if request.path == "/metrics":
            return web.Response(text="vllm:num_requests_running 0\n")
        assert request.transport is not None
        request.transport.close()  # dies mid-request, before any byte
        return web.Response()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def test_dead_and_dying_engines_are_routed_around(
        tmp_path: Path, engine_fleet: LocalEngineFleet, unique_prompt: str) -> None:
    dying = DyingEngine()
    await dying.start()
    real = [e.address for e in engine_fleet.engines]
    with __import__("socket").socket() as sock:  # a port nobody listens on (killed engine)
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    addresses = [*real, f"127.0.0.1:{dying.port}", dead]
    try:
        async with router_for(tmp_path, addresses, engine_fleet.model_name) as router, \
                aiohttp.ClientSession(timeout=TIMEOUT) as s:

            async def complete(i: int) -> tuple[int, str]:
                async with s.post(f"{url_of(router)}/v1/completions", json={
                        "model": "chat", "prompt": f"{unique_prompt} request {i}",
                        "max_tokens": 2}) as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("x-kvroute-endpoint", "")

            first = await asyncio.gather(*(complete(i) for i in range(8)))
            await dying.stop()  # now the dying engine is dead too
            second = await asyncio.gather(*(complete(i) for i in range(8, 16)))
        assert all(status == 200 for status, _ in first + second)
        assert {endpoint for _, endpoint in first + second} <= set(real)
    finally:
        await dying.stop()


async def test_ext_proc_pick_then_engine_serves(tmp_path: Path, engine_fleet: LocalEngineFleet,
                                                unique_prompt: str) -> None:
    addresses = [e.address for e in engine_fleet.engines]
    async with router_for(tmp_path, addresses, engine_fleet.model_name) as router, \
            grpc.aio.insecure_channel(f"127.0.0.1:{router.ports['ext_proc']}") as channel:
        process = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=ep.ProcessingRequest.SerializeToString,
            response_deserializer=ep.ProcessingResponse.FromString)
        body = json.dumps({"model": "chat", "prompt": unique_prompt + "envoy", "max_tokens": 3})

        async def messages() -> AsyncIterator[Any]:
            yield ep.ProcessingRequest(request_headers=ep.HttpHeaders(
                headers=base_pb2.HeaderMap(headers=[
                    base_pb2.HeaderValue(key=":path", raw_value=b"/v1/completions"),
                    base_pb2.HeaderValue(key=":method", raw_value=b"POST")])))
            yield ep.ProcessingRequest(request_body=ep.HttpBody(body=body.encode(),
                                                                end_of_stream=True))

        responses = [r async for r in process(messages(), timeout=30)]
        common = responses[1].request_body.response
        target = next(h.header.raw_value.decode() for h in common.header_mutation.set_headers
                      if h.header.key == "x-gateway-destination-endpoint")
        assert target in addresses
        # Do what Envoy does: send the (mutated) body to the chosen endpoint.
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.post(
                f"http://{target}/v1/completions", data=common.body_mutation.body,
                headers={"content-type": "application/json"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["usage"]["completion_tokens"] == 3


async def test_pick_report_over_a_channel_with_real_engines(
        tmp_path: Path, engine_fleet: LocalEngineFleet, unique_prompt: str) -> None:
    addresses = [e.address for e in engine_fleet.engines]
    async with router_for(tmp_path, addresses, engine_fleet.model_name) as router, \
            RouterClient(f"127.0.0.1:{router.ports['grpc']}") as client:
        pick = await client.pick(pb.PickRequest(model="chat", messages=pb.ChatMessages(
            messages=[pb.ChatMessage(role="user", content=unique_prompt + "sidecar")])))
        assert pick.endpoint in addresses and pick.target_model == engine_fleet.model_name
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.post(
                f"http://{pick.endpoint}/v1/chat/completions", json={
                    "model": pick.target_model, "max_tokens": 2, "messages": [
                        {"role": "user", "content": unique_prompt + "sidecar"}]}) as resp:
            assert resp.status == 200
            usage = (await resp.json())["usage"]
        report = await client.report(pb.ReportRequest(
            decision_id=pick.decision_id, status=200, e2e_seconds=0.1,
            prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"]))
        assert report.accepted
        assert all(e.in_flight == 0 for e in router.datastore.endpoints())
