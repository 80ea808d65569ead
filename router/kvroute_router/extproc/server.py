"""Envoy ``envoy.service.ext_proc.v3.ExternalProcessor`` speaking the Gateway API Inference
Extension's endpoint-picker protocol (GIE ``docs/proposals/004-endpoint-picker-protocol``), plus
``grpc.health.v1``.

Per HTTP request Envoy opens one ``Process`` stream; its first message carries the filter's
``protocol_config`` (body modes). Supported processing modes: request headers ``SEND``;
request body ``FULL_DUPLEX_STREAMED`` (GIE's mode; trailers ``SEND``) or ``BUFFERED``; response
headers ``SEND``; response body ``FULL_DUPLEX_STREAMED``, ``STREAMED``, ``BUFFERED`` or ``NONE``.

Request side. The destination must travel in a header mutation that Envoy applies before the
router filter picks the upstream, so:

* ``BUFFERED``: the request headers are answered at once (continue); the whole body arrives in
  one message and is answered with a ``BodyResponse`` whose header mutation names the pod (and
  whose body mutation rewrites ``model``/``max_tokens`` when the router must);
* ``FULL_DUPLEX_STREAMED``: the headers answer is held back while the body chunks are gathered
  (a stream ends with a chunk marked ``end_of_stream`` or with trailers); then the headers are
  answered with the destination, and the (possibly rewritten) body is sent back as
  ``StreamedBodyResponse`` chunks, the last marked ``end_of_stream`` unless trailers follow,
  which are answered in turn.

The pick is announced per the protocol: header ``x-gateway-destination-endpoint`` = the primary
pod (Envoy's ORIGINAL_DST cluster, which the chart's sidecar uses, reads one ``ip:port``), and
dynamic metadata ``envoy.lb``/``x-gateway-destination-endpoint`` = the primary followed by the
fallbacks, comma separated (gateways whose load balancer walks the list retry down it). Errors
are ``ImmediateResponse``s with OpenAI JSON bodies: 400/404/413, 429 (shed, with
``retry-after``), 503 (no endpoint, or none in the subset hint).

Response side. The ``:status`` and the served endpoint (``envoy.lb``/
``x-gateway-destination-endpoint-served`` in the metadata context, or the same-named response
header the chart's sidecar adds) are read from the response headers; response body chunks are
passed back unmodified (``StreamedBodyResponse`` in full-duplex mode, an empty ``BodyResponse``
otherwise) while the tail is kept for the engine's ``usage``, which settles budgets. The request
counts in flight on its endpoint until the stream ends (the request lifecycle of
``framework/lifecycle.py``: ``open`` dispatches the first attempt, the stream's end finishes it).

Before routing, a response-cache hit is answered with an ``ImmediateResponse`` (HTTP 200, JSON
or SSE) and needs no engine; trust-gated headers (tenant, priority, scope, policy match headers)
are believed only with ``trust_gateway_headers``, i.e. behind a gateway that strips clients'
copies (docs/security.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import msgspec
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.lifecycle import Outcome, RequestRouter, RoutedRequest, RoutingError
from kvroute_router.framework.request import LLMRequest
from kvroute_router.grpc_health import add_health, set_serving
from kvroute_router.grpcauth import BearerAuthInterceptor, CallerTokens
from kvroute_router.openai.errors import BadRequestError, error_body
from kvroute_router.openai.requests import decode_body, endpoint_kind, parse_request
from kvroute_router.openai.upstream import PRIORITY_HEADER, upstream_changes
from kvroute_router.openai.usage import USAGE_TAIL, streamed_events, streamed_tokens, usage_of
from kvroute_router.responsecache import CACHE_HEADER, CacheLookup, ResponseCache
from kvroute_router.trust import HeaderTrust, PolicyCatalog

log = logging.getLogger(__name__)

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# GIE health services: liveness (the process answers) and readiness (it can pick).
HEALTH_SERVICES = [SERVICE, "liveness", "readiness"]
DESTINATION_HEADER = "x-gateway-destination-endpoint"
SERVED_KEY = "x-gateway-destination-endpoint-served"
# Set on Envoy's local reply when the picked pod failed before answering (the chart's sidecar
# bootstrap: %RESPONSE_FLAGS%, e.g. UF = connection failure).
UPSTREAM_FAILURE_HEADER = "x-kvroute-upstream-failure"
# How long a pod that refused a connection stays out of picks.
UNAVAILABLE_FOR_S = 2.0
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
MAX_BODY_BYTES = 32 * 1024 * 1024
# Body bytes per StreamedBodyResponse sent back to Envoy (GIE's EPP uses ~62 KB).
STREAM_CHUNK_BYTES = 64 * 1024
OVERWRITE = base_pb2.HeaderValueOption.HeaderAppendAction.Value("OVERWRITE_IF_EXISTS_OR_ADD")
Mode = processing_mode_pb2.ProcessingMode
FULL_DUPLEX = Mode.FULL_DUPLEX_STREAMED


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=OVERWRITE)


def immediate(status: int, message: str, code: str, retry_after: float | None = None,
              param: str | None = None) -> Any:
    """An ``ImmediateResponse`` with an OpenAI-style JSON error body."""
    headers = [_header("content-type", "application/json")]
    if retry_after is not None:
        headers.append(_header("retry-after", str(max(1, int(retry_after + 0.999)))))
    return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status),
        headers=ep.HeaderMutation(set_headers=headers),
        body=error_body(status, message, code, param), details=f"kvroute_{code}"))


def _headers_of(message: Any) -> dict[str, str]:
    return {h.key.lower(): (h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value)
            for h in message.headers.headers}


def _subset_hint(request: Any) -> frozenset[str] | None:
    """GIE's subset hint: the pods the data plane allows (``None``: no hint, any pod)."""
    if not request.HasField("metadata_context"):
        return None
    namespaces = request.metadata_context.filter_metadata
    if SUBSET_NAMESPACE not in namespaces:
        return None
    value = namespaces[SUBSET_NAMESPACE].fields.get(SUBSET_KEY)
    if value is None:
        return None
    if value.HasField("list_value"):
        return frozenset(v.string_value for v in value.list_value.values)
    return frozenset(a.strip() for a in value.string_value.split(",") if a.strip())


def _served_endpoint(request: Any, headers: dict[str, str]) -> str | None:
    """The pod that answered, as the data plane reports it: ``envoy.lb``/
    ``x-gateway-destination-endpoint-served`` in the metadata context (the protocol), else a
    response header of that name (the chart's sidecar sets it from ``%UPSTREAM_HOST%``)."""
    if request.HasField("metadata_context"):
        namespaces = request.metadata_context.filter_metadata
        if LB_NAMESPACE in namespaces:
            value = namespaces[LB_NAMESPACE].fields.get(SERVED_KEY)
            if value is not None and value.string_value:
                served: str = value.string_value.strip()
                return served
    header = headers.get(SERVED_KEY, "").strip()
    return header or None


def _streamed_body(body: bytes, end_of_stream: bool) -> Iterator[Any]:
    """``body`` as full-duplex ``StreamedBodyResponse`` request-body answers."""
    chunks = [body[i:i + STREAM_CHUNK_BYTES]
              for i in range(0, len(body), STREAM_CHUNK_BYTES)] or [b""]
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        yield ep.ProcessingResponse(request_body=ep.BodyResponse(response=ep.CommonResponse(
            body_mutation=ep.BodyMutation(streamed_response=ep.StreamedBodyResponse(
                body=chunk, end_of_stream=end_of_stream and last)))))


def _response_body_answer(body: Any, full_duplex: bool) -> Any:
    """A response body chunk passed back unmodified."""
    if not full_duplex:
        return ep.ProcessingResponse(response_body=ep.BodyResponse())
    return ep.ProcessingResponse(response_body=ep.BodyResponse(response=ep.CommonResponse(
        body_mutation=ep.BodyMutation(streamed_response=ep.StreamedBodyResponse(
            body=body.body, end_of_stream=body.end_of_stream)))))


@dataclass
class _Routed:
    """The router's answer for a request: where it goes, and the body to forward."""

    routed: RoutedRequest
    set_headers: list[Any]
    remove_headers: list[str]
    """Client headers Envoy must not forward (vLLM's priority header, when the router sets the
    body's priority)."""
    metadata: Any
    body: bytes
    body_changed: bool


@dataclass
class _Exchange:
    """The state of one ``Process`` stream (one HTTP request)."""

    request_full_duplex: bool = False
    response_full_duplex: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    subset: frozenset[str] | None = None
    routed: RoutedRequest | None = None
    endpoint: Endpoint | None = None
    lookup: CacheLookup = field(default_factory=CacheLookup)
    recorder: Any = None
    status: int = 0
    tail: bytes = b""
    events: list[int] = field(default_factory=lambda: [0])
    ttft_s: float | None = None
    started: float = field(default_factory=time.monotonic)


class ExtProcServer:
    """The ``Process`` stream handler."""

    def __init__(self, director: RequestRouter, catalog: PolicyCatalog,
                 response_cache: ResponseCache | None = None,
                 trust_gateway_headers: bool = False) -> None:
        self.director = director
        self.response_cache = response_cache
        self.trust = HeaderTrust(catalog)
        self.trust_gateway_headers = trust_gateway_headers
        """Believe trust-gated headers: the gateway strips clients' copies (docs/security.md)."""

    async def process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        x = _Exchange()
        first = True
        try:
            async for request in requests:
                if first:
                    first = False
                    if request.HasField("protocol_config"):
                        config = request.protocol_config
                        x.request_full_duplex = config.request_body_mode == FULL_DUPLEX
                        x.response_full_duplex = config.response_body_mode == FULL_DUPLEX
                which = request.WhichOneof("request")
                if which == "request_headers":
                    answers = self._on_request_headers(x, request)
                elif which == "request_body":
                    answers = await self._on_request_body(x, request)
                elif which == "request_trailers":
                    answers = await self._on_request_trailers(x, request)
                elif which == "response_headers":
                    answers = self._on_response_headers(x, request)
                elif which == "response_body":
                    answers = self._on_response_body(x, request.response_body)
                elif which == "response_trailers":
                    answers = [ep.ProcessingResponse(response_trailers=ep.TrailersResponse())]
                else:
                    answers = []
                for answer in answers:
                    yield answer
                    if answer.HasField("immediate_response"):
                        return
        finally:
            self._settle(x)

    # -- request side -----------------------------------------------------------------------

    def _on_request_headers(self, x: _Exchange, request: Any) -> list[Any]:
        x.headers = _headers_of(request.request_headers)
        x.subset = _subset_hint(request)
        if request.request_headers.end_of_stream:
            method = x.headers.get(":method", "GET")
            return [immediate(
                404 if method == "GET" else 400,
                f"{method} {x.headers.get(':path', '/')} has no body: kvroute's gateway path "
                "routes OpenAI POST /v1/completions and /v1/chat/completions requests (use the "
                "router's own HTTP port for /v1/models)", "unsupported_request")]
        if x.request_full_duplex:
            return []  # answered with the destination once the body is complete
        return [ep.ProcessingResponse(request_headers=ep.HeadersResponse())]

    async def _on_request_body(self, x: _Exchange, request: Any) -> list[Any]:
        x.body.extend(request.request_body.body)
        if len(x.body) > MAX_BODY_BYTES:
            return [immediate(413, f"Request body larger than {MAX_BODY_BYTES} bytes",
                              "request_too_large")]
        if x.subset is None:
            x.subset = _subset_hint(request)
        if not request.request_body.end_of_stream:
            return []
        return await self._route(x, trailers=False)

    async def _on_request_trailers(self, x: _Exchange, request: Any) -> list[Any]:
        answers = [] if x.routed is not None else await self._route(x, trailers=True)
        if answers and answers[-1].HasField("immediate_response"):
            return answers
        return [*answers, ep.ProcessingResponse(request_trailers=ep.TrailersResponse())]

    async def _route(self, x: _Exchange, trailers: bool) -> list[Any]:
        """Pick for the complete body; the answers that forward it (or one error)."""
        routed = await self._pick(x, bytes(x.body))
        if not isinstance(routed, _Routed):
            return [routed]
        x.routed = routed.routed
        x.endpoint = routed.routed.decision.endpoints[0]  # dispatched by open()
        x.recorder = x.lookup.recorder()
        # The pod may still be computing this prompt's prefix for an earlier request: hold
        # the answer (Envoy holds the request) until it is cached (scoring.prefillWaitMs).
        await x.routed.wait_for_prefill(x.routed.decision.prefill_wait_s)
        if x.request_full_duplex:
            headers = ep.ProcessingResponse(
                request_headers=ep.HeadersResponse(response=ep.CommonResponse(
                    header_mutation=ep.HeaderMutation(set_headers=[
                        *routed.set_headers,
                        _header("content-length", str(len(routed.body)))],
                        remove_headers=routed.remove_headers),
                    clear_route_cache=True)),
                dynamic_metadata=routed.metadata)
            return [headers, *_streamed_body(routed.body, end_of_stream=not trailers)]
        common = ep.CommonResponse(header_mutation=ep.HeaderMutation(set_headers=[
            *routed.set_headers,
            *([_header("content-length", str(len(routed.body)))] if routed.body_changed
              else [])], remove_headers=routed.remove_headers), clear_route_cache=True)
        if routed.body_changed:
            common.body_mutation.CopyFrom(ep.BodyMutation(body=routed.body))
        return [ep.ProcessingResponse(request_body=ep.BodyResponse(response=common),
                                      dynamic_metadata=routed.metadata)]

    async def _pick(self, x: _Exchange, raw: bytes) -> _Routed | Any:
        """Parse, consult the response cache, route (the first attempt is dispatched); the
        routing answer, or one ``ImmediateResponse`` (an error, or a cache hit)."""
        kind: Literal["completions", "chat"] = (
            "chat" if endpoint_kind(x.headers.get(":path", "")) == "chat" else "completions")
        headers = self.trust.for_routing(x.headers, self.trust_gateway_headers)
        try:
            parsed = parse_request(decode_body(raw), kind)
        except BadRequestError as exc:
            return immediate(400, str(exc), exc.code, param=exc.param)
        request = LLMRequest.from_openai(parsed, headers)
        request.allowed_addresses = x.subset
        if self.response_cache is not None:
            x.lookup = await self.response_cache.lookup(request)
            if x.lookup.hit:  # answered by Envoy from the cache: no engine, no budget
                return cached_immediate(x.lookup)
        try:
            routed = await self.director.open(request, entrypoint="ext_proc")
        except RoutingError as exc:
            return immediate(exc.status, exc.message, exc.code, exc.retry_after, exc.param)
        try:
            decision = routed.decision
            addresses = [e.address for e in decision.endpoints]
            metadata = struct_pb2.Struct()
            metadata.update({LB_NAMESPACE: {DESTINATION_HEADER: ",".join(addresses)}})
            priority = decision.engine_priority(decision.endpoints[0])
            changes = upstream_changes(parsed.body, parsed.kind, decision.served_model,
                                       decision.request.max_tokens, priority=priority)
            forwarded = msgspec.json.encode({**parsed.body, **changes}) if changes else raw
            return _Routed(routed=routed,
                           set_headers=[_header(DESTINATION_HEADER, addresses[0])],
                           remove_headers=[] if priority is None else [PRIORITY_HEADER],
                           metadata=metadata, body=forwarded, body_changed=bool(changes))
        except BaseException as exc:
            routed.close(exc)
            raise

    # -- response side ----------------------------------------------------------------------

    def _on_response_headers(self, x: _Exchange, request: Any) -> list[Any]:
        headers = _headers_of(request.response_headers)
        try:
            x.status = int(headers.get(":status", "0"))
        except ValueError:
            x.status = 0
        served = _served_endpoint(request, headers)
        if (served and x.routed is not None and x.endpoint is not None
                and served != x.endpoint.address):
            moved = next((e for e in x.routed.decision.endpoints if e.address == served), None)
            if moved is not None:  # the data plane fell back down the list
                x.routed.end_attempt()
                x.endpoint = moved
                x.routed.dispatch(moved)
        if x.endpoint is not None and headers.get(UPSTREAM_FAILURE_HEADER):
            # The pod never answered: route the next requests (the client's retry) elsewhere.
            log.info("pod %s failed before answering (%s)", x.endpoint.address,
                     headers[UPSTREAM_FAILURE_HEADER])
            self.director.mark_unavailable(x.endpoint, UNAVAILABLE_FOR_S)
        return [ep.ProcessingResponse(response_headers=ep.HeadersResponse(
            response=_cache_header(x.lookup)))]

    def _on_response_body(self, x: _Exchange, body: Any) -> list[Any]:
        """The engine's answer passes through unmodified; its tail is kept for ``usage``."""
        chunk = body.body
        if chunk:
            if x.ttft_s is None:
                x.ttft_s = time.monotonic() - x.started
                if x.routed is not None:
                    x.routed.answering()  # the prompt is computed: off the prefill backlog
            if x.routed is not None and x.routed.decision.request.stream:
                x.events[0] += streamed_events(x.tail, chunk)
            x.tail = (x.tail + chunk)[-USAGE_TAIL:]
            if x.recorder is not None:
                x.recorder.feed(chunk)
        if body.end_of_stream and x.recorder is not None:
            x.lookup.finish(x.recorder, x.status)  # stored only when complete and successful
            x.recorder = None
        return [_response_body_answer(body, x.response_full_duplex)]

    def _settle(self, x: _Exchange) -> None:
        """The stream is over: the attempt ends and the request is accounted."""
        if x.routed is None or x.endpoint is None:
            return
        prompt_tokens, completion_tokens = usage_of(x.tail)
        stream = x.routed.decision.request.stream
        if completion_tokens is None and stream and x.tail:
            completion_tokens = streamed_tokens(x.events[0], x.routed.decision.request.kind)
        x.routed.finish(x.endpoint, Outcome(
            status=x.status or 499, ttft_s=x.ttft_s if stream else None,
            e2e_s=time.monotonic() - x.started,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))


def cached_immediate(lookup: CacheLookup) -> Any:
    """A response-cache hit as an ``ImmediateResponse`` (HTTP 200, JSON or SSE)."""
    body, content_type = lookup.body()
    return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=200),
        headers=ep.HeaderMutation(set_headers=[_header("content-type", content_type),
                                               _header(CACHE_HEADER, str(lookup.match))]),
        body=body, details="kvroute_response_cache_hit"))


def _cache_header(lookup: CacheLookup) -> Any:
    """``x-kvroute-cache: miss`` on the engine's answer when the policy uses the cache."""
    if lookup.header is None:
        return None
    return ep.CommonResponse(header_mutation=ep.HeaderMutation(
        set_headers=[_header(CACHE_HEADER, lookup.header)]))


async def start_ext_proc_server(director: RequestRouter, host: str, port: int, *,
                                catalog: PolicyCatalog,
                                response_cache: ResponseCache | None = None,
                                trust_gateway_headers: bool = False,
                                tokens: CallerTokens | None = None) -> tuple[Any, int]:
    """Start a ``grpc.aio`` server with ext_proc and health; returns (server, bound port).
    With ``tokens``, ext_proc calls need a caller token (:mod:`kvroute_router.grpcauth`)."""
    interceptors = [BearerAuthInterceptor(tokens, [SERVICE])] if tokens is not None else []
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", MAX_BODY_BYTES + 65536)],
        interceptors=interceptors)
    handler = ExtProcServer(director, catalog, response_cache,
                            trust_gateway_headers=trust_gateway_headers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Process": grpc.stream_stream_rpc_method_handler(
            handler.process, request_deserializer=ep.ProcessingRequest.FromString,
            response_serializer=ep.ProcessingResponse.SerializeToString),
    }),))
    servicer = add_health(server, HEALTH_SERVICES)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await set_serving(servicer, HEALTH_SERVICES)
    return server, bound
