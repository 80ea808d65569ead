"""Router start and stop (issue 16): readiness (``/ready``) is false until the datastore has
its first complete listing and again from the start of shutdown, while liveness (``/health``)
answers throughout; on shutdown an in-flight ext_proc stream gets ``shutdown_grace_s`` to
finish (it was cut after 1 s, mid-response for any stream longer than that) and new streams
are refused. Real aiohttp and grpc.aio servers on loopback."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from kvroute_api.inference_pool import InferencePool
from kvroute_api.route_policy import RoutePolicy
from kvroute_router.app import Router, RouterSettings

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
PAST_THE_OLD_GRACE_S = 2.5  # the old ext_proc grace was 1 s


def _objects() -> tuple[list[InferencePool], list[RoutePolicy]]:
    pool = InferencePool.model_validate({
        "kind": "InferencePool", "metadata": {"name": "local"},
        "spec": {"mode": "External", "model": {"name": "served-model"},
                 "resources": {"gpus": 0},
                 "endpoints": [{"name": "e0", "address": "10.0.0.1:8000"}]}}, by_alias=True)
    policy = RoutePolicy.model_validate({
        "kind": "RoutePolicy", "metadata": {"name": "chat"},
        "spec": {"match": {"model": "chat"}, "pools": [{"name": "local"}]}}, by_alias=True)
    return [pool], [policy]


def _router(**ports: Any) -> Router:
    settings = RouterSettings(host="127.0.0.1", http_port=None, ext_proc_port=None,
                              grpc_port=None, metrics_port=None, kv_events=False, budgets=False,
                              shutdown_grace_s=30.0)
    for name, value in ports.items():
        setattr(settings, name, value)
    return Router(settings)


def _headers() -> Any:
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=":path", raw_value=b"/v1/chat/completions"),
                 base_pb2.HeaderValue(key=":method", raw_value=b"POST"),
                 base_pb2.HeaderValue(key="content-type", value="application/json")])))


async def test_readiness_waits_for_the_first_listing_and_liveness_does_not() -> None:
    router = _router(http_port=0)
    await router.start()
    try:
        base = f"http://127.0.0.1:{router.ports['http']}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"{base}/ready") as response:
                assert response.status == 503
                assert (await response.json())["loaded"] is False
            async with http.get(f"{base}/health") as response:
                assert response.status == 200
            router.datastore.replace(*_objects())  # the first listing
            async with http.get(f"{base}/ready") as response:
                assert response.status == 200
    finally:
        await router.stop()
    assert not router.ready()  # draining


async def test_an_in_flight_ext_proc_stream_finishes_within_the_grace() -> None:
    router = _router(ext_proc_port=0)
    router.datastore.replace(*_objects())
    await router.start()
    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.ports['ext_proc']}") as channel:
            process = channel.stream_stream(
                PROCESS, request_serializer=ep.ProcessingRequest.SerializeToString,
                response_deserializer=ep.ProcessingResponse.FromString)
            call = process(timeout=60)
            await call.write(_headers())
            assert (await call.read()).WhichOneof("response") == "request_headers"
            await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(
                body=json.dumps({"model": "chat", "messages": [
                    {"role": "user", "content": "hi"}]}).encode(), end_of_stream=True)))
            assert (await call.read()).WhichOneof("response") == "request_body"

            stopping = asyncio.create_task(router.stop())  # SIGTERM mid-stream
            await asyncio.sleep(PAST_THE_OLD_GRACE_S)
            assert not router.ready()
            assert not stopping.done()  # waiting for the stream
            refused = process(timeout=10)  # nothing new is accepted
            try:
                await refused.write(_headers())
                await refused.read()
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                pass
            else:
                assert await refused.code() != grpc.StatusCode.OK

            # The upstream answers; the stream ends normally.
            await call.write(ep.ProcessingRequest(response_headers=ep.HttpHeaders(
                headers=base_pb2.HeaderMap(headers=[
                    base_pb2.HeaderValue(key=":status", raw_value=b"200")]))))
            assert (await call.read()).WhichOneof("response") == "response_headers"
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 30)
    finally:
        if stopping is None:
            await router.stop()
