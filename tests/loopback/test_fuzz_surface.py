"""Property tests (hypothesis, bounded examples) of the router's request surfaces against a
running ``Router`` in front of loopback fake engines (issue 16 item 3): the proxy's HTTP
surface, ext_proc message sequences over a real grpc.aio channel, and gRPC Pick/Report.

The router, its engines and the clients live on one event loop in a background thread (one
router for all examples; hypothesis drives the examples from the test's thread). After every
example: a client fault never got a 5xx, nothing hung (each example is bounded by
``asyncio.timeout``), no endpoint slot and no budget reservation stayed in flight, and nothing
was logged at ERROR (an unhandled exception in a handler is logged there)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from kvroute_router.app import Router
from kvroute_router.extproc.server import start_ext_proc_server
from kvroute_router.grpcapi.client import RouterClient
from kvroute_router.grpcapi.server import start_router_grpc_server
from kvroute_router.proto_gen import router_pb2 as pb

from .test_router_loopback import FakeEngine, running_router

pytestmark = pytest.mark.loopback

T = TypeVar("T")
EXAMPLE_BOUND_S = 30.0
"""Hang detector per example (an example takes milliseconds)."""

FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


class Rig:
    """A router with two fake engines and a budgeted policy, served from a background loop."""

    engines: list[FakeEngine]
    router: Router
    url: str
    session: aiohttp.ClientSession
    channel: grpc.aio.Channel
    process: Any
    client: RouterClient

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tmp_path = tmp_path
        self.stopped = asyncio.Event()
        self.ready = threading.Event()
        self.task = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        if not self.ready.wait(60):
            raise RuntimeError(f"the router did not start: {self.task}")

    async def _serve(self) -> None:
        self.engines = [FakeEngine(), FakeEngine()]
        for engine in self.engines:
            await engine.start()
        budgets = [{"name": "each", "tenant": "*", "maxConcurrency": 1000}]
        async with running_router(self.tmp_path, self.engines, budgets=budgets) as (
                router, url):
            self.router, self.url = router, url
            self.session = aiohttp.ClientSession()
            ext_proc, ext_port = await start_ext_proc_server(
                router.director, "127.0.0.1", 0, catalog=router.datastore)
            pick, pick_port = await start_router_grpc_server(
                router.director, "127.0.0.1", 0, catalog=router.datastore)
            self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{ext_port}")
            self.process = self.channel.stream_stream(
                "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                request_serializer=ep.ProcessingRequest.SerializeToString,
                response_deserializer=ep.ProcessingResponse.FromString)
            self.client = RouterClient(f"127.0.0.1:{pick_port}")
            self.ready.set()
            try:
                await self.stopped.wait()
            finally:
                await self.client.close()
                await self.channel.close()
                await ext_proc.stop(None)
                await pick.stop(None)
                await self.session.close()
        for engine in self.engines:
            await engine.stop()

    def run(self, coro: Awaitable[T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(EXAMPLE_BOUND_S):
                return await coro
        return asyncio.run_coroutine_threadsafe(bounded(), self.loop).result()

    def in_flight(self) -> tuple[int, float]:
        """(endpoint slots in flight, budget reservations in flight)."""
        slots = sum(e.in_flight for e in self.router.datastore.endpoints())
        reserved = sum(s.value for metric in self.router.metrics.registry.collect()
                       if metric.name == "kvroute_budget_in_flight" for s in metric.samples)
        return slots, reserved

    async def settled(self) -> None:
        """Slots and reservations go back to 0 (the answer to the client may precede the
        router's own bookkeeping by a few loop turns)."""
        for _ in range(2000):
            if self.in_flight() == (0, 0.0):
                return
            await asyncio.sleep(0.005)
        pytest.fail(f"leaked: (slots, reservations) in flight = {self.in_flight()}")

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stopped.set)
        self.task.result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("fuzz"))
    yield rig
    rig.close()


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    caplog.clear()
    assert not errors, [r.getMessage() + (r.exc_text or "") for r in errors]


# -- bodies ------------------------------------------------------------------------------------

json_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
             | st.floats(allow_nan=False) | st.text(max_size=40))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=5)
                          | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                          max_leaves=25)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stream",
          "stream_options", "n", "temperature", "top_p", "stop", "user", "seed", "logprobs",
          "ignore_eos", "echo", "best_of", "response_format", "tools"]
valid_messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=30)}),
    min_size=1, max_size=3)


@st.composite
def openai_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly-valid requests with some fields set to any JSON value."""
    body: dict[str, Any] = {"model": draw(st.sampled_from(["chat", "chat", "nope", ""]))}
    if draw(st.booleans()):
        body["prompt"] = draw(st.text(max_size=60))
    if draw(st.booleans()):
        body["messages"] = draw(valid_messages)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        body[name] = draw(json_value)
    if draw(st.booleans()):
        body["max_tokens"] = draw(st.integers(-5, 2**40))
    return body


@st.composite
def valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A request both endpoints accept (prompt and messages), or so with one odd field."""
    body: dict[str, Any] = {"model": "chat", "prompt": draw(st.text(max_size=60)),
                            "messages": draw(valid_messages),
                            "max_tokens": draw(st.integers(1, 16)),
                            "stream": draw(st.booleans())}
    if draw(st.booleans()):
        body[draw(st.sampled_from(FIELDS))] = draw(json_value)
    return body


def deep(depth: int) -> bytes:
    return b'{"model": "chat", "prompt": ' + b"[" * depth + b"]" * depth + b"}"


raw_bodies = st.one_of(
    valid_bodies().map(lambda b: json.dumps(b).encode()),
    valid_bodies().map(lambda b: json.dumps(b).encode()),
    openai_bodies().map(lambda b: json.dumps(b).encode()),
    json_value.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.integers(1, 200_000).map(deep),
    st.sampled_from([b"", b"{", b"\xff\xfe", b'{"model": "chat", "prompt": "x"' + b" " * 5,
                     b'{"model": "chat", "prompt": "' + b"a" * 900_000 + b'"}']),
)
header_name = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz-"), min_size=1, max_size=20)
header_value = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
headers = st.dictionaries(
    st.sampled_from(["content-type", "x-kvroute-tenant", "x-kvroute-priority",
                     "x-gateway-destination-endpoint-subset", "authorization",
                     "x-kvroute-endpoint", "content-encoding", "transfer-encoding"])
    | header_name, header_value, max_size=4)

PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready",
         "/metrics", "/v1/embeddings", "/v1/completions/x", "/%ff", "/v1//completions"]


def _is_openai_error(payload: Any) -> bool:
    error = payload.get("error") if isinstance(payload, dict) else None
    return (isinstance(error, dict) and isinstance(error.get("message"), str)
            and "type" in error and "param" in error)


async def _http(rig: Rig, method: str, path: str, body: bytes, hdrs: dict[str, str]
                ) -> tuple[int, bytes, str]:
    async with rig.session.request(method, f"{rig.url}{path}", data=body or None,
                                   headers=hdrs, skip_auto_headers=["content-type"]) as resp:
        data = await resp.read()
        return resp.status, data, resp.headers.get("content-type", "")


@settings(FUZZ, max_examples=150)
@given(method=st.sampled_from(["POST"] * 12 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]),
       path=st.sampled_from(PATHS[:2] * 10 + PATHS), body=raw_bodies, hdrs=headers)
@example(method="POST", path="/v1/chat/completions", hdrs={},
         body=b'{"model": "chat", "messages": [1]}')
@example(method="POST", path="/v1/completions", hdrs={}, body=deep(100_000))
@example(method="POST", path="/v1/completions", hdrs={"transfer-encoding": "]-"},
         body=deep(5047))  # was an ERROR log line with aiohttp's traceback
def test_proxy_http_surface(rig: Rig, caplog: pytest.LogCaptureFixture, method: str, path: str,
                            body: bytes, hdrs: dict[str, str]) -> None:
    caplog.set_level(logging.ERROR)
    status, data, content_type = rig.run(_http(rig, method, path, body, hdrs))
    event(f"HTTP {status}")
    # The engines always answer: anything the router sends them is served; so a 5xx here is
    # the router's own fault on a client's input.
    assert status < 500, (status, data[:300])
    framing = {k.lower() for k in hdrs} & {"transfer-encoding"}
    if status >= 400 and path in PATHS[:2] and method == "POST" and not framing:
        # (A request aiohttp cannot parse, bad framing, is answered 400 text/plain by aiohttp
        # before any handler runs: there is no request to name a field of.)
        assert "json" in content_type, (status, data[:200])
        assert _is_openai_error(json.loads(data)), data[:300]
    rig.run(rig.settled())
    no_errors_logged(caplog)


# -- ext_proc ---------------------------------------------------------------------------------

def _hdrs(pairs: dict[str, str], end_of_stream: bool = False) -> Any:
    return ep.HttpHeaders(end_of_stream=end_of_stream, headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]))


Mode = processing_mode_pb2.ProcessingMode
BODY_MODES = [Mode.BUFFERED, Mode.FULL_DUPLEX_STREAMED, Mode.STREAMED, Mode.NONE]


@st.composite
def ext_proc_sequences(draw: st.DrawFn) -> list[Any]:
    body = draw(raw_bodies.filter(lambda b: len(b) < 100_000))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    last_eos = draw(st.sampled_from(["eos", "eos", "trailers", "missing"]))
    path = draw(st.sampled_from(PATHS[:2] * 3 + PATHS))
    method = draw(st.sampled_from(["POST", "POST", "GET", "PUT"]))
    messages: list[Any] = [ep.ProcessingRequest(request_headers=_hdrs(
        {":path": path, ":method": method, **draw(headers)},
        end_of_stream=draw(st.integers(0, 9)) == 0))]
    for i, chunk in enumerate(chunks):
        messages.append(ep.ProcessingRequest(request_body=ep.HttpBody(
            body=chunk, end_of_stream=last_eos == "eos" and i == len(chunks) - 1)))
    if last_eos == "trailers":
        messages.append(ep.ProcessingRequest(request_trailers=ep.HttpTrailers()))
    if draw(st.booleans()):  # the response side
        status = draw(st.sampled_from(["200", "500", "503", "abc", ""]))
        messages.append(ep.ProcessingRequest(response_headers=_hdrs({":status": status})))
        for tail in draw(st.lists(st.binary(max_size=80) | st.just(
                b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'),
                max_size=3)):
            messages.append(ep.ProcessingRequest(response_body=ep.HttpBody(body=tail)))
        if draw(st.booleans()):
            messages.append(ep.ProcessingRequest(response_body=ep.HttpBody(end_of_stream=True)))
        if draw(st.booleans()):
            messages.append(ep.ProcessingRequest(response_trailers=ep.HttpTrailers()))
    if draw(st.integers(0, 5)) == 0:  # any order
        messages = draw(st.permutations(messages))
    if draw(st.booleans()):
        messages[0].protocol_config.request_body_mode = draw(st.sampled_from(BODY_MODES))
        messages[0].protocol_config.response_body_mode = draw(st.sampled_from(BODY_MODES))
    return messages


async def _ext_proc(rig: Rig, messages: list[Any]) -> list[Any]:
    """Send like Envoy: one message at a time, none after the stream was answered with an
    ``ImmediateResponse`` (the server has ended it). The answers; an RPC error raises."""
    call = rig.process(timeout=EXAMPLE_BOUND_S)
    answers: list[Any] = []

    async def read() -> None:
        async for answer in call:
            answers.append(answer)

    reader = asyncio.create_task(read())
    for message in messages:
        if reader.done() or any(a.HasField("immediate_response") for a in answers):
            break
        try:
            await call.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            break  # the server ended the stream meanwhile; its status is read below
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call.done_writing()
    try:
        await reader
    except grpc.aio.AioRpcError as exc:
        # grpc's client reports its own failed send after the server ended the stream (an
        # answer the client had not read yet) as INTERNAL "execute_batch"; anything else is the
        # server's status and fails the example.
        if "execute_batch" not in (exc.debug_error_string() or ""):
            raise
    return answers


@settings(FUZZ, max_examples=120)
@given(messages=ext_proc_sequences())
def test_ext_proc_message_sequences(rig: Rig, caplog: pytest.LogCaptureFixture,
                                    messages: list[Any]) -> None:
    caplog.set_level(logging.ERROR)
    answers = rig.run(_ext_proc(rig, messages))  # an RPC error raises here
    event("immediate" if any(a.HasField("immediate_response") for a in answers) else "routed"
          if any(a.HasField("dynamic_metadata") for a in answers) else "not routed")
    for answer in answers:
        if answer.HasField("immediate_response"):
            immediate = answer.immediate_response
            assert immediate.status.code < 500, immediate.body[:300]
            assert _is_openai_error(json.loads(immediate.body)), immediate.body[:300]
    rig.run(rig.settled())
    no_errors_logged(caplog)


# -- gRPC Pick / Report -----------------------------------------------------------------------

pick_requests = st.builds(
    pb.PickRequest, model=st.sampled_from(["chat", "chat", "nope", ""]) | st.text(max_size=8),
    prompt=st.text(max_size=80), tenant=st.text(max_size=10),
    headers=st.dictionaries(header_name, header_value, max_size=3),
    request_id=st.text(max_size=10), max_tokens=st.integers(0, 2**32 - 1)) | st.builds(
    pb.PickRequest, model=st.just("chat"),
    messages=st.builds(pb.ChatMessages, messages=st.lists(st.builds(
        pb.ChatMessage, role=st.text(max_size=10), content=st.text(max_size=30)), max_size=4)),
    max_tokens=st.integers(0, 64)) | st.builds(
    pb.PickRequest, model=st.just("chat"),
    token_ids=st.builds(pb.TokenIds, ids=st.lists(st.integers(0, 2**32 - 1), max_size=50)))
reports = st.builds(pb.ReportRequest, decision_id=st.text(max_size=12),
                    endpoint=st.text(max_size=20), status=st.integers(0, 2**32 - 1),
                    ttft_seconds=st.floats(), e2e_seconds=st.floats(),
                    prompt_tokens=st.integers(0, 2**32 - 1),
                    completion_tokens=st.integers(0, 2**32 - 1))
CLIENT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.OUT_OF_RANGE}


async def _pick_report(rig: Rig, request: Any, report: Any, mode: str) -> None:
    try:
        picked = await rig.client.pick(request)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in CLIENT_CODES, (exc.code(), exc.details())
        picked = None
    if picked is not None and mode != "garbage":
        report.decision_id = picked.decision_id
        if mode == "endpoint":
            report.endpoint = picked.endpoint
    try:
        await rig.client.report(report)
        if picked is not None:  # a second report of the same decision is not counted twice
            await rig.client.report(report)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in CLIENT_CODES, (exc.code(), exc.details())
    if picked is not None and mode == "garbage":  # settle the decision for the leak check
        await rig.client.report(pb.ReportRequest(decision_id=picked.decision_id, status=200))


@settings(FUZZ, max_examples=100)
@given(request=pick_requests, report=reports,
       mode=st.sampled_from(["decision", "endpoint", "garbage"]))
def test_pick_and_report(rig: Rig, caplog: pytest.LogCaptureFixture, request: Any,
                         report: Any, mode: str) -> None:
    caplog.set_level(logging.ERROR)
    rig.run(_pick_report(rig, request, report, mode))
    rig.run(rig.settled())
    no_errors_logged(caplog)
