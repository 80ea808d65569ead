"""The proxy against fake engines on loopback (the ``loopback`` tier: real servers on
127.0.0.1, no vLLM): streaming
without buffering, retries before the first byte, client disconnects, OpenAI errors and
timeouts. The fakes speak just enough of vLLM's HTTP API (SSE completions and /metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
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
from kvroute_router.extproc.server import start_ext_proc_server
from kvroute_router.grpcapi.client import RouterClient
from kvroute_router.grpcapi.server import start_router_grpc_server
from kvroute_router.proto_gen import router_pb2 as pb

from tests.routers import running

pytestmark = pytest.mark.loopback

METRICS = ('vllm:num_requests_running{engine="0"} 0.0\n'
           'vllm:num_requests_waiting{engine="0"} 0.0\n'
           'vllm:kv_cache_usage_perc{engine="0"} 0.1\n')


@dataclass
class FakeEngine:
    """A loopback HTTP server imitating one vLLM engine."""

    mode: str = "ok"  # ok | fail | hang | die (the connection drops after the first bytes)
    # | garbage (bytes that are not HTTP, then the connection closes)
    # | long (``events`` events of ``event_bytes``, each written on its own, then the usage
    # event when asked for, then [DONE])
    events: int = 40
    event_bytes: int = 0
    event_gap_s: float = 0.002
    sent: bytes = b""
    kv_usage: float = 0.1
    release: asyncio.Event = field(default_factory=asyncio.Event)
    gate_stream: bool = False
    gate_first: bool = False  # hold back even the first byte until ``release``
    hold_prompt: str | None = None  # a stream with this prompt: its first byte waits as above
    requests: int = 0
    cancelled: int = 0
    models_seen: list[str] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=METRICS.replace("} 0.1", f"}} {self.kv_usage}"))

    async def long_stream(self, request: web.Request, body: dict[str, Any]
                          ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        pad = "x" * self.event_bytes
        events = [f'data: {{"choices":[{{"text":"t{i}{pad}"}}]}}\n\n'.encode()
                  for i in range(self.events)]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(b'data: {"choices":[],"usage":{"prompt_tokens":3,'
                          b'"completion_tokens":%d}}\n\n' % self.events)
        for event in events:
            await response.write(event)
            self.sent += event
            await asyncio.sleep(self.event_gap_s)
        await response.write(b"data: [DONE]\n\n")
        self.sent += b"data: [DONE]\n\n"
        await response.write_eof()
        return response

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.headers_seen.append({k.lower(): v for k, v in request.headers.items()})
        body = await request.json()
        self.models_seen.append(body["model"])
        self.bodies.append(body)
        if self.mode == "fail":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        try:
            if self.mode == "garbage":
                assert request.transport is not None
                request.transport.write(b"SSH-2.0-not-http\r\n\r\n")
                request.transport.close()
            if self.mode in ("hang", "garbage"):
                await asyncio.sleep(3600)
            if self.mode == "die":  # killed mid-answer: no final chunk, no [DONE]
                response = web.StreamResponse(headers={"content-type": (
                    "text/event-stream" if body.get("stream") else "application/json")})
                await response.prepare(request)
                await response.write(b'data: {"choices":[{"text":"first"}]}\n\n'
                                     if body.get("stream") else b'{"choices": [{"te')
                assert request.transport is not None
                request.transport.abort()
                return response
            if self.mode == "long" and body.get("stream"):
                return await self.long_stream(request, body)
            if not body.get("stream"):
                return web.json_response({"choices": [{"text": "hello"}],
                                          "usage": {"prompt_tokens": 3,
                                                    "completion_tokens": 1}})
            if self.gate_first or body.get("prompt") == self.hold_prompt:
                await asyncio.wait_for(self.release.wait(), 30)
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b'data: {"choices":[{"text":"first"}]}\n\n')
            if self.gate_stream:
                await asyncio.wait_for(self.release.wait(), 30)
            await response.write(b'data: {"choices":[{"text":"second"}]}\n\n')
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait until ``condition()`` holds; fail naming ``what`` if it does not within the
    (generous, hang-detecting) bound."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        if condition():
            return
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{what} within {timeout_s} s")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_router(tmp_path: Path, engines: list[FakeEngine] | list[str],
                         scrape_interval_s: float = 0.05, trust_tenant_header: bool = False,
                         pool_engine: dict[str, Any] | None = None,
                         **policy_spec: object) -> AsyncIterator[tuple[Router, str]]:
    addresses = [e if isinstance(e, str) else e.address for e in engines]
    docs = [
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
         "metadata": {"name": "fake"},
         "spec": {"mode": "External", "model": {"name": "fake-model"}, "resources": {"gpus": 0},
                  **({"engine": pool_engine} if pool_engine else {}),
                  "endpoints": [{"name": f"fake-{i}", "address": a}
                                for i, a in enumerate(addresses)]}},
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy", "metadata": {"name": "chat"},
         "spec": {"match": {"model": "chat"}, "pools": [{"name": "fake"}],
                  **{"scoring": {"scorers": [{"type": "prefix-approx", "weight": 3},
                                             {"type": "running-requests"}]}, **policy_spec}}},
    ]
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump_all(docs))
    async with running(RouterSettings(config_paths=[config], host="127.0.0.1", http_port=0,
                                      ext_proc_port=None, grpc_port=None, metrics_port=None,
                                      scrape_interval_s=scrape_interval_s,
                                      config_poll_interval_s=0.05,
                                      trust_tenant_header=trust_tenant_header)) as started:
        yield started


@pytest.fixture
async def engines() -> AsyncIterator[list[FakeEngine]]:
    fakes = [FakeEngine(), FakeEngine()]
    for fake in fakes:
        await fake.start()
    yield fakes
    for fake in fakes:
        fake.release.set()
        await fake.stop()


async def test_stream_is_relayed_chunk_by_chunk(tmp_path: Path, engines: list[FakeEngine]
                                                ) -> None:
    for fake in engines:
        fake.gate_stream = True
    async with running_router(tmp_path, engines) as (router, url), aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", json={
                "model": "chat", "prompt": "p", "stream": True}) as resp:
            assert resp.status == 200
            served = resp.headers["x-kvroute-endpoint"]
            # The first chunk arrives while the engine still holds back the rest.
            first = await asyncio.wait_for(resp.content.readline(), 10)
            assert b"first" in first
            for fake in engines:
                fake.release.set()
            rest = await asyncio.wait_for(resp.content.read(), 10)
            assert b"second" in rest and b"[DONE]" in rest
        fake = next(f for f in engines if f.address == served)
        assert fake.models_seen == ["fake-model"]  # the virtual name was rewritten
        ttft = router.metrics.registry.get_sample_value(
            "kvroute_ttft_seconds_count", {"policy": "chat", "pool": "fake"})
        assert ttft == 1.0


@pytest.mark.parametrize("mode", ["fail", "garbage"])
async def test_failure_before_first_byte_is_retried_elsewhere(
        tmp_path: Path, engines: list[FakeEngine], mode: str) -> None:
    engines[0].mode = mode
    async with running_router(tmp_path, engines) as (router, url), aiohttp.ClientSession() as s:
        # Ties are broken at random: 20 requests reach the failing engine with near certainty.
        for i in range(20):
            async with s.post(f"{url}/v1/completions",
                              json={"model": "chat", "prompt": f"{i:02d}" * 300}) as resp:
                assert resp.status == 200
                assert resp.headers["x-kvroute-endpoint"] == engines[1].address
                assert (await resp.json())["choices"][0]["text"] == "hello"
        assert engines[0].requests >= 1
        assert router.metrics.registry.get_sample_value(
            "kvroute_retries_total", {"policy": "chat", "pool": "fake"}) == engines[0].requests


async def test_refused_connections_are_routed_around(tmp_path: Path,
                                                     engines: list[FakeEngine]) -> None:
    dead = engines[0].address
    await engines[0].stop()
    async with running_router(tmp_path, [dead, engines[1].address]) as (_, url), \
            aiohttp.ClientSession() as s:
        for i in range(4):
            async with s.post(f"{url}/v1/completions",
                              json={"model": "chat", "prompt": f"{i}"}) as resp:
                assert resp.status == 200
                assert resp.headers["x-kvroute-endpoint"] == engines[1].address


async def test_client_disconnect_cancels_the_upstream_request(
        tmp_path: Path, engines: list[FakeEngine]) -> None:
    for fake in engines:
        fake.gate_stream = True
    async with running_router(tmp_path, engines) as (router, url):
        async with aiohttp.ClientSession() as s, s.post(
                f"{url}/v1/completions",
                json={"model": "chat", "prompt": "p", "stream": True}) as resp:
            await asyncio.wait_for(resp.content.readline(), 10)
        # The client is gone; the engine's handler must be cancelled soon after.
        await eventually(lambda: sum(f.cancelled for f in engines) >= 1,
                         "the upstream request was not cancelled")
        assert sum(f.cancelled for f in engines) == 1
        await eventually(lambda: sum(e.in_flight for e in router.datastore.endpoints()) == 0,
                         "the cancelled request's slot was not released")


def _backlog(router: Router) -> dict[str, float]:
    return {ep.address: ep.prefill_backlog for ep in router.datastore.endpoints()}


async def test_the_prefill_backlog_counts_a_prompt_until_its_first_byte(
        tmp_path: Path, engines: list[FakeEngine]) -> None:
    """``prefill-cost`` reads each endpoint's prefill backlog: a dispatched prompt counts
    there until the engine's first byte (then it is computed), and never after the request."""
    engines[0].mode = "hang"
    engines[1].gate_stream = True
    scoring = {"scorers": [{"type": "prefill-cost"}]}
    body = {"model": "chat", "prompt": "p" * 4000, "stream": True}  # 1,000 tokens (estimate)
    async with running_router(tmp_path, engines[:1], scoring=scoring) as (router, url), \
            aiohttp.ClientSession() as s:
        hanging = asyncio.create_task(s.post(f"{url}/v1/completions", json=body))
        await eventually(lambda: engines[0].requests == 1, "the request reached the engine")
        assert _backlog(router) == {engines[0].address: 1000.0}  # no byte yet: not computed
        hanging.cancel()  # the client gives up
        with contextlib.suppress(asyncio.CancelledError):
            await hanging
        await eventually(lambda: _backlog(router) == {engines[0].address: 0.0},
                         "the abandoned prompt left the backlog")
    async with running_router(tmp_path, engines[1:], scoring=scoring) as (router, url), \
            aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        await asyncio.wait_for(resp.content.readline(), 10)  # the first chunk
        # Still streaming (the engine holds back the rest), but the prompt is computed.
        assert [ep.in_flight for ep in router.datastore.endpoints()] == [1]
        assert _backlog(router) == {engines[1].address: 0.0}
        engines[1].release.set()
        assert b"[DONE]" in await asyncio.wait_for(resp.content.read(), 10)
        assert router.metrics.registry.get_sample_value(
            "kvroute_prefill_backlog_tokens", {"pool": "default/fake", "endpoint": "fake-0"}) == 0


async def test_openai_errors(tmp_path: Path, engines: list[FakeEngine]) -> None:
    async with running_router(tmp_path, engines,
                              admission={"maxOutputTokens": 100}) as (router, url), \
            aiohttp.ClientSession() as s:
        cases = [
            (b"{not json", 400),
            (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404),
            (json.dumps({"model": "chat", "prompt": "x", "max_tokens": 1000}).encode(), 400),
            (json.dumps({"model": "chat"}).encode(), 400),
            (b'{"model": "chat", "prompt": "' + b"x" * (33 * 1024 * 1024) + b'"}', 413),
        ]
        for body, status in cases:
            async with s.post(f"{url}/v1/completions", data=body,
                              headers={"content-type": "application/json"}) as resp:
                assert resp.status == status
                error = (await resp.json())["error"]
                assert error["message"] and error["type"]
        async with s.get(f"{url}/v1/nothing") as resp:
            assert resp.status == 404 and "error" in await resp.json()
        async with s.get(f"{url}/v1/models") as resp:
            ids = {m["id"] for m in (await resp.json())["data"]}
            # "fake-model" is served by a pool the policy targets: only "chat" may be used
            # (docs/security.md).
            assert ids == {"chat"}
        # /health is the liveness answer ("ok" while the process serves); what changes is in
        # the counts: both fakes scraped healthy.
        async with s.get(f"{url}/health") as resp:
            health = await resp.json()
            assert resp.status == 200 and health["status"] == "ok"
            assert health["loaded"] is True and health["endpoints"] == 2
        await eventually(lambda: all(e.metrics is not None
                                     for e in router.datastore.endpoints()),
                         "the fakes were not scraped")
        async with s.get(f"{url}/health") as resp:
            assert (await resp.json())["healthy_endpoints"] == 2
        async with s.get(f"{url}/metrics") as resp:
            assert "kvroute_decision_latency_seconds" in await resp.text()


async def test_hanging_engines_time_out_with_504_and_dead_ones_503(
        tmp_path: Path, engines: list[FakeEngine]) -> None:
    for fake in engines:
        fake.mode = "hang"
    retries = {"maxAttempts": 2, "perTryTimeoutMs": 300}
    body = {"model": "chat", "prompt": "p", "stream": True}
    async with running_router(tmp_path, engines, retries=retries) as (_, url), \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s, \
            s.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "timeout"
    addresses = [f.address for f in engines]
    for fake in engines:
        await fake.stop()
    async with running_router(tmp_path, addresses) as (_, url), aiohttp.ClientSession() as s, \
            s.post(f"{url}/v1/completions", json={"model": "chat", "prompt": "p"}) as resp:
        assert resp.status == 503
        assert "error" in await resp.json()


async def test_a_stream_queued_at_a_busy_engine_waits_past_the_per_try_timeout(
        tmp_path: Path, engines: list[FakeEngine]) -> None:
    """An engine that keeps answering other requests while a stream waits for its first byte
    (queued behind them, or behind newer ones on a priority engine) is busy, not stuck: the
    stream keeps its place past ``perTryTimeoutMs`` instead of being given up (and, with
    another endpoint, computed a second time there). With nothing else answered it is given
    up after the per-try timeout, as before."""
    fake = engines[0]
    fake.hold_prompt = "queued"
    retries = {"maxAttempts": 2, "perTryTimeoutMs": 300}

    def extensions(router: Router) -> float:
        return sum(s.value for metric in router.metrics.registry.collect()
                   if metric.name == "kvroute_per_try_extensions" for s in metric.samples
                   if s.name.endswith("_total"))

    async with running_router(tmp_path, engines[:1], retries=retries) as (router, url), \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        async def others() -> None:  # 1.5 s of other answers: five per-try periods
            for i in range(15):
                async with s.post(f"{url}/v1/completions", json={
                        "model": "chat", "prompt": f"other {i}", "stream": True}) as other:
                    assert other.status == 200
                    await other.read()
                await asyncio.sleep(0.1)
            fake.release.set()

        busy = asyncio.create_task(others())
        async with s.post(f"{url}/v1/completions", json={
                "model": "chat", "prompt": "queued", "stream": True}) as resp:
            assert resp.status == 200
            assert b"[DONE]" in await resp.read()
        await busy
        assert fake.requests == 16  # one attempt each: the queued one was never given up
        assert extensions(router) >= 3
        fake.release.clear()  # now it waits with nothing else answered: stuck
        async with s.post(f"{url}/v1/completions", json={
                "model": "chat", "prompt": "queued", "stream": True}) as resp:
            assert resp.status == 504
            assert (await resp.json())["error"]["code"] == "timeout"


async def test_config_reload_does_not_drop_a_stream(tmp_path: Path,
                                                   engines: list[FakeEngine]) -> None:
    for fake in engines:
        fake.gate_stream = True
    async with running_router(tmp_path, engines[:1]) as (router, url), \
            aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", json={
                "model": "chat", "prompt": "p", "stream": True}) as resp:
            assert await asyncio.wait_for(resp.content.readline(), 10)
            # Swap the pool to the other engine while the stream is open.
            config = tmp_path / "router.yaml"
            config.write_text(config.read_text().replace(engines[0].address,
                                                         engines[1].address))
            await eventually(lambda: [e.address for e in router.datastore.endpoints()]
                             == [engines[1].address], "the config reload was not applied")
            engines[0].release.set()
            rest = await asyncio.wait_for(resp.content.read(), 10)
            assert b"[DONE]" in rest
        engines[1].release.set()
        async with s.post(f"{url}/v1/completions", json={"model": "chat", "prompt": "q"}) as r2:
            assert r2.status == 200
            assert r2.headers["x-kvroute-endpoint"] == engines[1].address


async def test_concurrent_distinct_requests_spread_before_the_next_scrape(
        tmp_path: Path, engines: list[FakeEngine]) -> None:
    # Engine 1 looks slightly busier (KV usage), so without counting its own fresh dispatches
    # the router would send the whole burst to engine 0. Default scoring (queue-depth sees
    # dispatches since the last scrape); one scrape at start-up, none during the burst. The
    # engines answer nothing until all six arrived: a first byte would (rightly) take its
    # prompt out of the engine's prefill backlog and make the split depend on timing.
    engines[1].kv_usage = 0.2
    for fake in engines:
        fake.gate_stream = True
        fake.gate_first = True
    async with running_router(tmp_path, engines, scrape_interval_s=30.0,
                              scoring={"staleMetricsMs": 600000}) as (router, url), \
            aiohttp.ClientSession() as s:
        await eventually(lambda: all(e.metrics is not None
                                     for e in router.datastore.endpoints()),
                         "the first scrape did not happen")

        async def first_line(i: int) -> str:
            async with s.post(f"{url}/v1/completions", json={
                    "model": "chat", "prompt": f"distinct {i} " * 100, "stream": True}) as resp:
                await asyncio.wait_for(resp.content.readline(), 10)
                return resp.headers["x-kvroute-endpoint"]

        tasks = [asyncio.create_task(first_line(i)) for i in range(6)]
        # Every request was routed and reached its engine before any finishes.
        await eventually(lambda: sum(f.requests for f in engines) == 6,
                         "the burst did not reach the engines")
        for fake in engines:
            fake.release.set()
        served = await asyncio.gather(*tasks)
    assert sorted(served).count(engines[0].address) == 3
    assert sorted(served).count(engines[1].address) == 3


# ---- hostile OpenAI bodies on every entry point ----------------------------------------------
DEEP = 100_000
CASES: list[tuple[str, bytes, str | None]] = [
    ("/v1/completions", b'{"model": "chat", "prompt": "x", "tools": ' + b"[" * DEEP
     + b"]" * DEEP + b"}", "tools"),
    ("/v1/completions", b"[" * DEEP + b"]" * DEEP, None),
    ("/v1/completions", b'{"model": "chat", "prompt": "\xff\xfe"}', "prompt"),
    ("/v1/completions", b'{"model": "chat", "prompt": "x", "max_tokens": 1e400}', "max_tokens"),
    ("/v1/completions", b'{"model": "chat", "prompt": "x", "max_tokens": '
     + str(10**30).encode() + b"}", "max_tokens"),
    ("/v1/completions", b'{"model": "chat", "prompt": "x", "max_tokens": NaN}', "max_tokens"),
    ("/v1/completions", b'{"model": "chat", "prompt": "x", "n": "many"}', "n"),
    ("/v1/chat/completions", b'{"model": "chat", "messages": [1]}', "messages"),
]


async def test_proxy_answers_hostile_bodies_with_400_naming_the_field(
        tmp_path: Path, engines: list[FakeEngine]) -> None:
    async with running_router(tmp_path, engines) as (router, url), \
            aiohttp.ClientSession() as s:
        for path, body, param in CASES:
            async with s.post(f"{url}{path}", data=body,
                              headers={"content-type": "application/json"}) as resp:
                assert resp.status == 400, (path, body[:60])
                error = (await resp.json())["error"]
                assert error["param"] == param and error["type"] == "invalid_request_error"
        assert sum(e.requests for e in engines) == 0
        async with s.post(f"{url}/v1/completions",
                          json={"model": "chat", "prompt": "still serving"}) as resp:
            assert resp.status == 200
        assert all(ep.in_flight == 0 for ep in router.datastore.endpoints())


def _headers(path: str) -> Any:
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=":path", raw_value=path.encode()),
                 base_pb2.HeaderValue(key=":method", raw_value=b"POST")])))


@contextlib.asynccontextmanager
async def ext_proc_exchange(router: Router
                            ) -> AsyncIterator[Callable[[str, bytes], Awaitable[list[Any]]]]:
    """An ext_proc server on ``router``'s director, and a way to send it one request as Envoy
    does (its headers, then the whole body): the answers Envoy would get."""
    server, port = await start_ext_proc_server(router.director, "127.0.0.1", 0,
                                               catalog=router.datastore)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(
                "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                request_serializer=ep.ProcessingRequest.SerializeToString,
                response_deserializer=ep.ProcessingResponse.FromString)

            async def exchange(path: str, body: bytes) -> list[Any]:
                messages = [_headers(path), ep.ProcessingRequest(
                    request_body=ep.HttpBody(body=body, end_of_stream=True))]
                return [r async for r in call(iter(messages), timeout=30)]

            yield exchange
    finally:
        await server.stop(None)


async def test_ext_proc_and_pick_answer_hostile_input_as_client_faults(
        tmp_path: Path, engines: list[FakeEngine]) -> None:
    async with running_router(tmp_path, engines) as (router, _):
        async with ext_proc_exchange(router) as exchange:
            for path, body, param in CASES:
                answers = await exchange(path, body)
                final = answers[-1].immediate_response
                assert final.status.code == 400, (path, body[:60])
                assert json.loads(final.body)["error"]["param"] == param
        pick_server, pick_port = await start_router_grpc_server(
            router.director, "127.0.0.1", 0, catalog=router.datastore)
        try:
            async with RouterClient(f"127.0.0.1:{pick_port}") as client:
                for message in (pb.PickRequest(model="chat", prompt="x", max_tokens=2**32 - 1),
                                pb.PickRequest(prompt="x")):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await client.pick(message)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await pick_server.stop(None)
        assert all(e.in_flight == 0 for e in router.datastore.endpoints())


async def test_the_output_bound_is_the_one_the_engine_reads_and_is_written_upstream(
        tmp_path: Path, engines: list[FakeEngine]) -> None:
    """Issue 14.4: null must not skip maxOutputTokens, and max_completion_tokens must not hide
    the max_tokens a completions engine reads."""
    chat = [{"role": "user", "content": "hi"}]
    async with running_router(tmp_path, engines, admission={"maxOutputTokens": 16}) as (
            router, url), aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", json={
                "model": "chat", "prompt": "x", "max_completion_tokens": 1,
                "max_tokens": 100000}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "max_tokens"
        cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
            ("/v1/chat/completions", {"messages": chat, "max_tokens": None},
             {"max_tokens": 16}),
            ("/v1/completions", {"prompt": "x", "max_tokens": None}, {"max_tokens": 16}),
            ("/v1/completions", {"prompt": "x"}, {"max_tokens": 16}),
            ("/v1/chat/completions", {"messages": chat, "max_completion_tokens": 5,
                                      "max_tokens": 100000}, {"max_completion_tokens": 5}),
        ]
        received: list[dict[str, Any]] = []
        for engine in engines:
            engine.bodies = received  # one list, in arrival order
        for path, body, expected in cases:
            async with s.post(f"{url}{path}", json={"model": "chat", **body}) as resp:
                assert resp.status == 200, await resp.text()
            seen = received[-1]
            assert {k: seen.get(k) for k in expected} == expected, (body, seen)

        async with ext_proc_exchange(router) as exchange:
            answers = await exchange("/v1/completions", json.dumps({
                "model": "chat", "prompt": "x", "max_completion_tokens": 1,
                "max_tokens": 100000}).encode())
            final = answers[-1].immediate_response
            assert final.status.code == 400
            assert json.loads(final.body)["error"]["param"] == "max_tokens"
            answers = await exchange("/v1/chat/completions", json.dumps({
                "model": "chat", "messages": chat, "max_tokens": None}).encode())
            common = answers[-1].request_body.response
            assert json.loads(common.body_mutation.body)["max_tokens"] == 16
        assert all(e.in_flight == 0 for e in router.datastore.endpoints())

@pytest.mark.parametrize("trusted", [False, True])
async def test_client_tenant_headers_choose_no_budget_unless_trusted(
        tmp_path: Path, engines: list[FakeEngine], trusted: bool) -> None:
    # One request per minute per tenant. An untrusted client naming two tenants in the header
    # is still one tenant (the default): the second request is refused and the engine never
    # sees the header. Behind a trusted gateway the header names the tenant.
    budgets = [{"name": "each", "tenant": "*", "requestsPerMinute": 1}]
    async with running_router(tmp_path, engines, trust_tenant_header=trusted,
                              tenancy={"header": "x-team"}, budgets=budgets) as (_, url), \
            aiohttp.ClientSession() as s:
        statuses = []
        for team in ("a", "b"):
            async with s.post(f"{url}/v1/completions", headers={"x-team": team},
                              json={"model": "chat", "prompt": "p", "max_tokens": 1}) as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    assert (await resp.json())["error"]["code"] == "budget_exhausted"
    assert statuses == ([200, 200] if trusted else [200, 429])
    seen = sorted((h.get("x-team") for engine in engines for h in engine.headers_seen), key=str)
    assert seen == (["a", "b"] if trusted else [None])


@pytest.mark.parametrize("stream", [True, False])
async def test_an_engine_dying_mid_answer_never_looks_like_a_clean_end(
        tmp_path: Path, engines: list[FakeEngine], stream: bool) -> None:
    """Issue 16: the client used to get 200 and a cleanly ended body (no [DONE], no error)
    while the router recorded 502. Now a stream carries an error event and no [DONE], and the
    connection is cut, so every HTTP client sees the answer as incomplete."""
    for engine in engines:
        engine.mode = "die"
    async with running_router(tmp_path, engines) as (router, url), \
            aiohttp.ClientSession() as s:
        received = b""
        failed = False
        async with s.post(f"{url}/v1/completions",
                          json={"model": "chat", "prompt": "hi", "stream": stream}) as resp:
            assert resp.status == 200
            try:
                async for chunk in resp.content.iter_any():
                    received += chunk
            except aiohttp.ClientPayloadError:
                failed = True
        assert b"[DONE]" not in received
        assert failed, f"the client saw a clean end: {received!r}"
        if stream:
            assert b'"upstream_stream_broken"' in received
        await eventually(lambda: all(ep.in_flight == 0 for ep in router.datastore.endpoints()),
                         "the attempt ended")


def test_the_relayed_answer_holds_its_head_for_its_first_bytes() -> None:
    """The relay's one-send head rests on aiohttp's class attribute (web.Response uses it); an
    aiohttp that renamed it would send the head alone again: this names the cause."""
    from kvroute_router.proxy.server import _RelayResponse

    assert "_send_headers_immediately" in vars(web.StreamResponse)
    assert web.StreamResponse._send_headers_immediately is True
    assert _RelayResponse._send_headers_immediately is False


def _count_upstream_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How often the relaying task got body bytes of an event stream from an engine's
    connection (each is one wake-up of that task; the scraper's pages are not counted)."""
    from kvroute_router.http1.client import UpstreamResponse

    reads = [0]
    read_some = UpstreamResponse.read_some

    async def counted(self: UpstreamResponse) -> bytes:
        if self.headers.get("content-type", "").startswith("text/event-stream"):
            reads[0] += 1
        return await read_some(self)

    monkeypatch.setattr(UpstreamResponse, "read_some", counted)
    return reads


@pytest.mark.parametrize("client_usage", [False, True])
async def test_a_long_stream_is_spliced_byte_for_byte_without_a_wake_up_per_event(
        tmp_path: Path, engines: list[FakeEngine], monkeypatch: pytest.MonkeyPatch,
        client_usage: bool) -> None:
    """Every event the engine writes on its own reaches the client unchanged and in order,
    without the relaying task waking for each (the upstream connection writes them to the
    client as they arrive); the usage event the router asked for (and the client did not) is
    still dropped, and still read for the request's accounting."""
    from kvroute_router.openai.usage import usage_of

    for engine in engines:
        engine.mode = "long"
    reads = _count_upstream_reads(monkeypatch)
    usages: list[tuple[int | None, int | None]] = []

    def recorded(tail: bytes) -> tuple[int | None, int | None]:
        usages.append(usage_of(tail))
        return usages[-1]

    monkeypatch.setattr("kvroute_router.proxy.server.usage_of", recorded)
    body: dict[str, Any] = {"model": "chat", "prompt": "p", "stream": True}
    if client_usage:
        body["stream_options"] = {"include_usage": True}
    async with running_router(tmp_path, engines) as (_, url), aiohttp.ClientSession() as s, \
            s.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        received = await asyncio.wait_for(resp.read(), 30)
        served = resp.headers["x-kvroute-endpoint"]
    engine = next(e for e in engines if e.address == served)
    expected = engine.sent if client_usage else engine.sent.replace(
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":40}}\n\n', b"")
    assert b'"usage"' in engine.sent  # the router asked for it either way
    assert received == expected
    assert usages == [(3, 40)]
    assert reads[0] <= 4, f"the relay woke {reads[0]} times for {engine.events + 2} events"


async def test_a_client_that_stops_reading_gets_every_byte_in_order(
        tmp_path: Path, engines: list[FakeEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    """A client whose socket fills up: splicing stops (the relay waits for the client instead
    of queueing the engine's answer in the router) and resumes; nothing is lost or reordered."""
    for engine in engines:
        engine.mode = "long"
        engine.events, engine.event_bytes, engine.event_gap_s = 400, 16 * 1024, 0.0
    reads = _count_upstream_reads(monkeypatch)
    async with running_router(tmp_path, engines) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # no autotuning
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        payload = json.dumps({"model": "chat", "prompt": "p", "stream": True}).encode()
        await loop.sock_sendall(sock, b"POST /v1/completions HTTP/1.1\r\nHost: r\r\n"
                                      b"Content-Type: application/json\r\n"
                                      b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        await asyncio.sleep(0.5)  # not reading: the router's writes to this client back up
        answer = bytearray()
        while not answer.endswith(b"\r\n0\r\n\r\n"):
            piece = await asyncio.wait_for(loop.sock_recv(sock, 65536), 30)
            assert piece, "the router closed the connection mid-answer"
            answer += piece
        sock.close()
    head, _, framed = bytes(answer).partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    body, rest = b"", framed
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body, rest = body + rest[:size], rest[size + 2:]
    served = [e for e in engines if e.sent]
    assert len(served) == 1 and body == served[0].sent.replace(
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":400}}\n\n', b"")
    assert reads[0] > 4, "splicing never stopped for the stalled client"


async def test_an_http10_client_gets_the_stream_unframed(
        tmp_path: Path, engines: list[FakeEngine]) -> None:
    """An HTTP/1.0 client cannot take chunked framing: its answer is the engine's bytes as
    they are, ended by the close (the relay does not splice chunk frames into it)."""
    for engine in engines:
        engine.mode = "long"
        engine.events = 20
    async with running_router(tmp_path, engines) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = json.dumps({"model": "chat", "prompt": "p", "stream": True,
                              "stream_options": {"include_usage": True}}).encode()
        writer.write(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        answer = await asyncio.wait_for(reader.read(), 30)  # to the close
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower()
    served = [e for e in engines if e.sent]
    assert len(served) == 1 and body == served[0].sent


@pytest.mark.parametrize("policy", ["FCFS", "Priority"])
async def test_engines_on_priority_scheduling_get_the_routers_priority_never_the_clients(
        tmp_path: Path, engines: list[FakeEngine], policy: str) -> None:
    """A pool whose engines run vLLM's priority scheduling: a client's body ``priority`` and
    vLLM's ``X-Vllm-Priority`` header (which overrides the body) would jump every queue; the
    router overwrites the one and drops the other, on the proxy and the ext_proc paths. FCFS
    engines ignore both, and get them as the client sent them."""
    received: list[dict[str, Any]] = []
    for engine in engines:
        engine.bodies = received
    before = time.time_ns() // 1_000_000
    async with running_router(tmp_path, engines, pool_engine={"schedulingPolicy": policy}) as (
            router, url), aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", headers={"X-Vllm-Priority": "-5"}, json={
                "model": "chat", "prompt": "p", "max_tokens": 1, "priority": -(2 ** 62)}) as resp:
            assert resp.status == 200, await resp.text()
        seen = [h for engine in engines for h in engine.headers_seen]
        if policy == "FCFS":
            assert received[-1]["priority"] == -(2 ** 62)
            assert seen[-1]["x-vllm-priority"] == "-5"
        else:
            assert received[-1]["priority"] >= before  # arrival ms + a penalty, never less
            assert "x-vllm-priority" not in seen[-1]

        async with ext_proc_exchange(router) as exchange:
            answers = await exchange("/v1/completions", json.dumps({
                "model": "chat", "prompt": "p", "max_tokens": 1,
                "priority": -(2 ** 62)}).encode())
            common = answers[-1].request_body.response
            mutation = common.header_mutation
            if policy == "FCFS":
                assert list(mutation.remove_headers) == []
            else:
                assert json.loads(common.body_mutation.body)["priority"] >= before
                assert list(mutation.remove_headers) == ["x-vllm-priority"]
    assert all(e.in_flight == 0 for e in router.datastore.endpoints())
