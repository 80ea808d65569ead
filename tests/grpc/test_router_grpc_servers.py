"""ext_proc (Envoy's messages) and kvroute.v1.Router Pick/Report over real grpc.aio channels
on port 0, plus gRPC health."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvroute_api.inference_pool import InferencePool
from kvroute_api.route_policy import RoutePolicy
from kvroute_router.datastore.store import Datastore
from kvroute_router.director import Director
from kvroute_router.extproc.server import start_ext_proc_server
from kvroute_router.framework.registry import PluginRegistry
from kvroute_router.grpcapi.client import RouterClient
from kvroute_router.grpcapi.server import start_router_grpc_server
from kvroute_router.plugins import register_builtin_plugins
from kvroute_router.proto_gen import router_pb2 as pb

from tests.unit.router.router_fixtures import with_precise_prefix

PROMPT = "Shared system prompt for the gRPC tests. " * 30


def _objects() -> tuple[InferencePool, RoutePolicy]:
    pool = InferencePool.model_validate({
        "kind": "InferencePool", "metadata": {"name": "local"},
        "spec": {"mode": "External", "model": {"name": "served-model"},
                 "resources": {"gpus": 0},
                 "endpoints": [{"name": f"e{i}", "address": f"10.0.0.{i + 1}:8000"}
                               for i in range(3)]}}, by_alias=True)
    policy = RoutePolicy.model_validate({
        "kind": "RoutePolicy", "metadata": {"name": "chat"},
        "spec": {"match": {"model": "chat"}, "pools": [{"name": "local"}],
                 "admission": {"maxPromptTokens": 5000}}}, by_alias=True)
    return pool, policy


@pytest.fixture
def director() -> Director:
    store = Datastore()
    pool, policy = _objects()
    store.replace([pool], [policy])
    return Director(store, register_builtin_plugins(PluginRegistry()), rng=random.Random(3))


def _headers(path: str) -> Any:
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=":path", raw_value=path.encode()),
                 base_pb2.HeaderValue(key=":method", raw_value=b"POST"),
                 base_pb2.HeaderValue(key="content-type", value="application/json")])))


def _body(payload: dict[str, Any]) -> Any:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=json.dumps(payload).encode(),
                                                         end_of_stream=True))


async def _exchange(port: int, messages: list[Any]) -> list[Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=ep.ProcessingRequest.SerializeToString,
            response_deserializer=ep.ProcessingResponse.FromString)

        async def source() -> AsyncIterator[Any]:
            for m in messages:
                yield m

        return [r async for r in call(source(), timeout=10)]


async def test_ext_proc_picks_sets_header_metadata_and_rewrites_model(director: Director
                                                                      ) -> None:
    server, port = await start_ext_proc_server(director, "127.0.0.1", 0, catalog=director.datastore)
    try:
        chosen = []
        for i in range(3):
            responses = await _exchange(port, [
                _headers("/v1/chat/completions"),
                _body({"model": "chat", "messages": [
                    {"role": "system", "content": PROMPT}, {"role": "user", "content": str(i)}]}),
                ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(
                    headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200")]))),
            ])
            assert [r.WhichOneof("response") for r in responses] == [
                "request_headers", "request_body", "response_headers"]
            common = responses[1].request_body.response
            headers = {h.header.key: h.header.raw_value.decode()
                       for h in common.header_mutation.set_headers}
            target = headers["x-gateway-destination-endpoint"]
            chosen.append(target)
            assert json.loads(common.body_mutation.body)["model"] == "served-model"
            assert headers["content-length"] == str(len(common.body_mutation.body))
            lb = responses[1].dynamic_metadata.fields["envoy.lb"].struct_value
            addresses = lb.fields["x-gateway-destination-endpoint"].string_value.split(",")
            assert addresses[0] == target and len(set(addresses)) == 3
        # The shared prefix keeps the same target once it was sent there.
        assert len(set(chosen)) == 1
        assert sum(e.in_flight for e in director.datastore.endpoints()) == 0
    finally:
        await server.stop(None)


async def test_ext_proc_immediate_responses(director: Director) -> None:
    server, port = await start_ext_proc_server(director, "127.0.0.1", 0, catalog=director.datastore)
    try:
        cases = [
            ({"model": "unknown", "prompt": "x"}, 404),
            ({"prompt": "x"}, 400),
            ({"model": "chat", "prompt": "x" * 40000}, 413),
        ]
        for payload, status in cases:
            responses = await _exchange(port, [_headers("/v1/completions"), _body(payload)])
            final = responses[-1]
            assert final.WhichOneof("response") == "immediate_response"
            assert final.immediate_response.status.code == status
            assert "error" in json.loads(final.immediate_response.body)
        for e in director.datastore.endpoints():  # every one refused a connection
            director.mark_unavailable(e, 60.0)
        responses = await _exchange(port, [_headers("/v1/completions"),
                                           _body({"model": "chat", "prompt": "x"})])
        assert responses[-1].immediate_response.status.code == 503
    finally:
        await server.stop(None)


async def test_ext_proc_subset_hint_restricts_candidates(director: Director) -> None:
    server, port = await start_ext_proc_server(director, "127.0.0.1", 0, catalog=director.datastore)
    try:
        hint = struct_pb2.Struct()
        hint.update({"x-gateway-destination-endpoint-subset": ["10.0.0.2:8000"]})
        headers = _headers("/v1/completions")
        headers.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
        for _ in range(5):
            responses = await _exchange(port, [headers, _body({"model": "chat", "prompt": "y"})])
            lb = responses[1].dynamic_metadata.fields["envoy.lb"].struct_value
            assert lb.fields["x-gateway-destination-endpoint"].string_value == "10.0.0.2:8000"
    finally:
        await server.stop(None)


async def test_pick_and_report_over_a_channel(director: Director) -> None:
    server, port = await start_router_grpc_server(director, "127.0.0.1", 0,
                                                  catalog=director.datastore)
    try:
        async with RouterClient(f"127.0.0.1:{port}") as client:
            first = await client.pick(pb.PickRequest(model="chat", prompt=PROMPT + "a"))
            assert first.endpoint.startswith("10.0.0.") and len(first.fallbacks) == 2
            assert first.target_model == "served-model" and first.policy == "chat"
            assert any(r.startswith("policy=") for r in first.reasons)
            assert {s.address for s in first.scores} == {"10.0.0.1:8000", "10.0.0.2:8000",
                                                         "10.0.0.3:8000"}
            endpoint = director.datastore.endpoint_by_address(first.endpoint)
            assert endpoint is not None and endpoint.in_flight == 1
            second = await client.pick(pb.PickRequest(model="chat", prompt=PROMPT + "b"))
            assert second.endpoint == first.endpoint and second.prefix_match_ratio > 0.9
            for d in (first, second):
                reply = await client.report(pb.ReportRequest(
                    decision_id=d.decision_id, status=200, ttft_seconds=0.1, e2e_seconds=0.5))
                assert reply.accepted
            assert endpoint.in_flight == 0
            again = await client.report(pb.ReportRequest(decision_id=first.decision_id))
            assert not again.accepted
            tokens = await client.pick(pb.PickRequest(
                model="chat", token_ids=pb.TokenIds(ids=list(range(64)))))
            assert tokens.endpoint
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.pick(pb.PickRequest(model="nope", prompt="x"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.pick(pb.PickRequest(model="chat", prompt="x" * 40000))
            assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
            health = health_pb2_grpc.HealthStub(client.channel)
            status = await health.Check(health_pb2.HealthCheckRequest(
                service="kvroute.v1.Router"))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


def _protocol(request_mode: str, response_mode: str) -> Any:
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2

    mode = processing_mode_pb2.ProcessingMode
    return ep.ProtocolConfiguration(request_body_mode=mode.BodySendMode.Value(request_mode),
                                    response_body_mode=mode.BodySendMode.Value(response_mode))


async def test_ext_proc_full_duplex_streamed_bodies(director: Director) -> None:
    """FULL_DUPLEX_STREAMED (GIE's mode, the chart's default), as Envoy 1.40 sends it: the
    destination rides on the headers answer, held until the last body chunk; the body goes back
    as StreamedBodyResponse chunks; response chunks come back unmodified as streamed responses.
    (A plain BodyResponse here makes Envoy fail the request: 'Spurious response message'.)"""
    server, port = await start_ext_proc_server(director, "127.0.0.1", 0, catalog=director.datastore)
    try:
        raw = json.dumps({"model": "chat", "stream": True, "messages": [
            {"role": "system", "content": PROMPT}, {"role": "user", "content": "hi"}]}).encode()
        first = _headers("/v1/chat/completions")
        first.protocol_config.CopyFrom(_protocol("FULL_DUPLEX_STREAMED", "FULL_DUPLEX_STREAMED"))
        half = len(raw) // 2
        sse = [b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
               b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1}}\n\n'
               b"data: [DONE]\n\n"]
        responses = await _exchange(port, [
            first,
            ep.ProcessingRequest(request_body=ep.HttpBody(body=raw[:half])),
            ep.ProcessingRequest(request_body=ep.HttpBody(body=raw[half:])),
            ep.ProcessingRequest(request_trailers=ep.HttpTrailers()),
            ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200")]))),
            ep.ProcessingRequest(response_body=ep.HttpBody(body=sse[0])),
            ep.ProcessingRequest(response_body=ep.HttpBody(body=sse[1], end_of_stream=True)),
        ])
        kinds = [r.WhichOneof("response") for r in responses]
        assert kinds == ["request_headers", "request_body", "request_trailers",
                         "response_headers", "response_body", "response_body"]
        common = responses[0].request_headers.response
        headers = {h.header.key: h.header.raw_value.decode()
                   for h in common.header_mutation.set_headers}
        lb = responses[0].dynamic_metadata.fields["envoy.lb"].struct_value
        assert lb.fields["x-gateway-destination-endpoint"].string_value.split(",")[0] == \
            headers["x-gateway-destination-endpoint"]
        streamed = responses[1].request_body.response.body_mutation.streamed_response
        assert json.loads(streamed.body)["model"] == "served-model"
        assert headers["content-length"] == str(len(streamed.body))
        assert not streamed.end_of_stream  # trailers follow
        for answer, chunk in zip(responses[4:], sse, strict=True):
            back = answer.response_body.response.body_mutation.streamed_response
            assert back.body == chunk
        assert responses[-1].response_body.response.body_mutation.streamed_response.end_of_stream
        assert sum(e.in_flight for e in director.datastore.endpoints()) == 0
    finally:
        await server.stop(None)


async def test_ext_proc_buffered_request_streamed_response(director: Director) -> None:
    """BUFFERED request body + STREAMED response body: headers answered at once, the body
    answer carries the destination, response chunks are acknowledged without mutation."""
    server, port = await start_ext_proc_server(director, "127.0.0.1", 0, catalog=director.datastore)
    try:
        first = _headers("/v1/completions")
        first.protocol_config.CopyFrom(_protocol("BUFFERED", "STREAMED"))
        responses = await _exchange(port, [
            first, _body({"model": "chat", "prompt": "x"}),
            ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200")]))),
            ep.ProcessingRequest(response_body=ep.HttpBody(body=b"{}", end_of_stream=True)),
        ])
        assert [r.WhichOneof("response") for r in responses] == [
            "request_headers", "request_body", "response_headers", "response_body"]
        assert not responses[0].request_headers.HasField("response")
        mutation = responses[1].request_body.response.header_mutation
        assert "x-gateway-destination-endpoint" in {h.header.key for h in mutation.set_headers}
        assert not responses[3].response_body.HasField("response")
    finally:
        await server.stop(None)


async def test_ext_proc_reads_back_the_served_endpoint(director: Director) -> None:
    """GIE x-gateway-destination-endpoint-served (envoy.lb metadata on the response): when the
    data plane fell back down the list, the request is accounted to the pod that served it."""
    server, port = await start_ext_proc_server(director, "127.0.0.1", 0, catalog=director.datastore)
    try:
        first = _headers("/v1/completions")
        first.protocol_config.CopyFrom(_protocol("BUFFERED", "NONE"))
        outbox: list[Any] = [first, _body({"model": "chat", "prompt": PROMPT})]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(
                "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                request_serializer=ep.ProcessingRequest.SerializeToString,
                response_deserializer=ep.ProcessingResponse.FromString)(timeout=10)
            for message in outbox:
                await call.write(message)
            await call.read()  # headers answer
            routed = await call.read()
            lb = routed.dynamic_metadata.fields["envoy.lb"].struct_value
            primary, fallback, *_ = lb.fields["x-gateway-destination-endpoint"] \
                .string_value.split(",")
            served = struct_pb2.Struct()
            served.update({"envoy.lb": {"x-gateway-destination-endpoint-served": fallback}})
            response_headers = ep.ProcessingRequest(
                response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
                    base_pb2.HeaderValue(key=":status", raw_value=b"200")])))
            response_headers.metadata_context.filter_metadata["envoy.lb"].CopyFrom(served.fields[
                "envoy.lb"].struct_value)
            await call.write(response_headers)
            await call.read()
            by_address = {e.address: e for e in director.datastore.endpoints()}
            assert by_address[fallback].in_flight == 1 and by_address[primary].in_flight == 0
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
        registry = director.metrics.registry
        assert registry.get_sample_value("kvroute_requests_total", {
            "policy": "chat", "pool": "local", "endpoint": by_address[fallback].name,
            "status": "200"}) == 1
        assert sum(e.in_flight for e in director.datastore.endpoints()) == 0
    finally:
        await server.stop(None)


async def test_ext_proc_request_without_body_gets_an_openai_404(director: Director) -> None:
    """GET /v1/models through the gateway: no body to route on, so an OpenAI 404 that names
    the router's own port, instead of a request Envoy could not forward anywhere."""
    server, port = await start_ext_proc_server(director, "127.0.0.1", 0, catalog=director.datastore)
    try:
        request = ep.ProcessingRequest(request_headers=ep.HttpHeaders(
            end_of_stream=True, headers=base_pb2.HeaderMap(headers=[
                base_pb2.HeaderValue(key=":path", raw_value=b"/v1/models"),
                base_pb2.HeaderValue(key=":method", raw_value=b"GET")])))
        [answer] = await _exchange(port, [request])
        assert answer.immediate_response.status.code == 404
        error = json.loads(answer.immediate_response.body)["error"]
        assert "/v1/models" in error["message"] and error["code"] == "unsupported_request"
    finally:
        await server.stop(None)


async def test_ext_proc_takes_a_prompt_off_the_prefill_backlog_at_its_first_answer_byte(
        director: Director) -> None:
    """The endpoint's prefill backlog (what ``prefill-cost`` reads) holds the prompt from the
    pick until Envoy relays the engine's first body bytes, not until the stream ends."""
    server, port = await start_ext_proc_server(director, "127.0.0.1", 0, catalog=director.datastore)
    try:
        first = _headers("/v1/completions")
        first.protocol_config.CopyFrom(_protocol("BUFFERED", "STREAMED"))
        status = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200")])))
        endpoints = director.datastore.endpoints()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(
                "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                request_serializer=ep.ProcessingRequest.SerializeToString,
                response_deserializer=ep.ProcessingResponse.FromString)(timeout=10)

            async def step(message: Any) -> None:
                await call.write(message)
                await call.read()

            await step(first)
            await step(_body({"model": "chat", "prompt": "x" * 400, "stream": True}))
            (served,) = [e for e in endpoints if e.in_flight]
            assert served.prefill_backlog == 100.0  # 400 bytes, nothing held: not computed
            await step(status)
            assert served.prefill_backlog == 100.0  # headers are not the prompt computed
            await step(ep.ProcessingRequest(response_body=ep.HttpBody(
                body=b'data: {"choices":[{"text":"a"}]}\n\n')))
            assert served.prefill_backlog == 0.0 and served.in_flight == 1  # still streaming
            await step(ep.ProcessingRequest(response_body=ep.HttpBody(
                body=b"data: [DONE]\n\n", end_of_stream=True)))
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK  # the stream is over
        assert [(e.in_flight, e.prefill_backlog) for e in endpoints] == [(0, 0.0)] * len(endpoints)
    finally:
        await server.stop(None)


async def test_ext_proc_holds_a_pick_while_its_pod_computes_the_prefix_for_an_earlier_one(
        ) -> None:
    """``scoring.prefillWaitMs`` on the gateway path: the second request of a context gets its
    destination (Envoy holds it meanwhile) once the first one's answer starts on that pod."""
    store = Datastore()
    pool, policy = _objects()
    policy = RoutePolicy.model_validate({**policy.model_dump(by_alias=True), "spec": {
        **policy.spec.model_dump(by_alias=True), "scoring": {
            "scorers": [{"type": "prefix-precise", "weight": 0}, {"type": "prefill-cost"}],
            "prefillWaitMs": 10_000}}}, by_alias=True)
    store.replace([pool], [policy])
    director = with_precise_prefix(Director(store, register_builtin_plugins(PluginRegistry()),
                                            rng=random.Random(3)), "default/local", 16)
    server, port = await start_ext_proc_server(director, "127.0.0.1", 0, catalog=store)
    context = list(range(1000, 1320))  # 20 blocks of 16 tokens
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            process = channel.stream_stream(
                "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                request_serializer=ep.ProcessingRequest.SerializeToString,
                response_deserializer=ep.ProcessingResponse.FromString)
            calls = [process(timeout=20), process(timeout=20)]
            answers = []
            for i, call in enumerate(calls):
                await call.write(_headers("/v1/completions"))
                await call.read()
                await call.write(_body({"model": "chat", "stream": True,
                                        "prompt": [*context, *range(i * 50, i * 50 + 16)]}))
                answers.append(asyncio.create_task(call.read()))
            routed = await asyncio.wait_for(answers[0], 5)
            (computing,) = [e for e in store.endpoints() if e.in_flight]
            await asyncio.sleep(0.1)
            assert not answers[1].done()  # held: its pod is computing the shared context
            assert computing.in_flight == 2  # ... but already counted there
            await calls[0].write(ep.ProcessingRequest(response_headers=ep.HttpHeaders(
                headers=base_pb2.HeaderMap(headers=[
                    base_pb2.HeaderValue(key=":status", raw_value=b"200")]))))
            await calls[0].read()
            assert not answers[1].done()  # response headers are not the prompt computed
            await calls[0].write(ep.ProcessingRequest(response_body=ep.HttpBody(
                body=b'data: {"choices":[{"text":"a"}]}\n\n')))
            held = await asyncio.wait_for(answers[1], 5)
            assert routed.HasField("request_body") and held.HasField("request_body")
            for call in calls:
                call.cancel()
        assert director.metrics.registry.get_sample_value(
            "kvroute_prefill_waits_total", {"pool": "local", "outcome": "answered"}) == 1
    finally:
        await server.stop(None)
    await asyncio.sleep(0.05)
    assert all(e.in_flight == 0 and not e.prefill_in_flight for e in store.endpoints())
