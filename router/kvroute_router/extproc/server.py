"""Envoy ``envoy.service.ext_proc.v3.ExternalProcessor`` speaking the Gateway API Inference
Extension's endpoint-picker protocol, plus ``grpc.health.v1``.

Per HTTP request Envoy opens one ``Process`` stream. Expected processing mode:
``request_header_mode: SEND``, ``request_body_mode: BUFFERED`` (or ``FULL_DUPLEX_STREAMED``:
chunks are gathered until ``end_of_stream``), ``response_header_mode: SEND``, response body
``NONE``. The server

* answers the request headers with an empty ``HeadersResponse`` (continue);
* on the complete body: parses it as an OpenAI request (path ``…/chat/completions`` → chat),
  routes it through the director, and answers with a ``BodyResponse`` whose header mutation
  sets ``x-gateway-destination-endpoint: ip:port`` (and rewrites ``model`` when the pool serves
  another name), with dynamic metadata ``envoy.lb`` → ``x-gateway-destination-endpoint`` =
  the target followed by fallbacks, comma separated;
* answers with an ``ImmediateResponse`` (OpenAI JSON body) for 400/404/413/429/503;
* counts the request in flight on the endpoint until the stream ends (Envoy closes it when
  the HTTP exchange is over); the ``:status`` of the response headers is the outcome.

A GIE subset hint (``metadata_context.filter_metadata["envoy.lb.subset_hint"]
["x-gateway-destination-endpoint-subset"]``) restricts the candidates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import grpc
import msgspec
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from kvroute_router.framework.lifecycle import Outcome, RequestRouter, RoutedRequest, RoutingError
from kvroute_router.framework.request import LLMRequest
from kvroute_router.grpc_health import add_health, set_serving
from kvroute_router.grpcauth import BearerAuthInterceptor, CallerTokens
from kvroute_router.openai.errors import BadRequestError, error_body
from kvroute_router.openai.requests import decode_body, endpoint_kind, parse_request
from kvroute_router.openai.upstream import upstream_changes
from kvroute_router.openai.usage import USAGE_TAIL, usage_of
from kvroute_router.responsecache import CACHE_HEADER, CacheLookup, ResponseCache
from kvroute_router.trust import HeaderTrust, PolicyCatalog

log = logging.getLogger(__name__)

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
DESTINATION_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
MAX_BODY_BYTES = 32 * 1024 * 1024
OVERWRITE = base_pb2.HeaderValueOption.HeaderAppendAction.Value("OVERWRITE_IF_EXISTS_OR_ADD")


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
        headers: dict[str, str] = {}
        body = bytearray()
        subset: frozenset[str] | None = None
        routed: RoutedRequest | None = None
        status = 0
        tail = b""
        started = time.monotonic()
        lookup = CacheLookup()
        recorder = None
        try:
            async for request in requests:
                which = request.WhichOneof("request")
                if which == "request_headers":
                    headers = _headers_of(request.request_headers)
                    subset = _subset_hint(request)
                    if request.request_headers.end_of_stream:
                        yield ep.ProcessingResponse(request_headers=ep.HeadersResponse())
                        continue
                    yield ep.ProcessingResponse(request_headers=ep.HeadersResponse())
                elif which == "request_body":
                    body.extend(request.request_body.body)
                    if len(body) > MAX_BODY_BYTES:
                        yield immediate(413, f"Request body larger than {MAX_BODY_BYTES} bytes",
                                        "request_too_large")
                        return
                    if not request.request_body.end_of_stream:
                        continue
                    if subset is None:
                        subset = _subset_hint(request)
                    answer, routed, lookup = await self._pick(headers, bytes(body), subset)
                    recorder = lookup.recorder()
                    yield answer
                    if routed is None:
                        return
                elif which == "response_headers":
                    try:
                        status = int(_headers_of(request.response_headers).get(":status", "0"))
                    except ValueError:
                        status = 0
                    yield ep.ProcessingResponse(response_headers=ep.HeadersResponse(
                        response=_cache_header(lookup)))
                elif which == "response_body":
                    # Only when Envoy is configured to send the response body (mode
                    # STREAMED/BUFFERED): the engine's usage settles budgets exactly.
                    tail = (tail + request.response_body.body)[-USAGE_TAIL:]
                    if recorder is not None:
                        recorder.feed(request.response_body.body)
                        if request.response_body.end_of_stream:
                            lookup.finish(recorder, status)
                            recorder = None
                    yield ep.ProcessingResponse(response_body=ep.BodyResponse())
                elif which == "request_trailers":
                    yield ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
                elif which == "response_trailers":
                    yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
        finally:
            if routed is not None:
                prompt_tokens, completion_tokens = usage_of(tail)
                routed.finish(routed.decision.endpoints[0], Outcome(
                    status=status or 499, e2e_s=time.monotonic() - started,
                    prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))

    async def _pick(self, headers: dict[str, str], raw: bytes,
                    subset: frozenset[str] | None
                    ) -> tuple[Any, RoutedRequest | None, CacheLookup]:
        """The answer to the complete request body, the routed request (None when the answer
        refuses it or comes from the response cache) and the cache lookup; the request's first
        attempt is dispatched."""
        kind: Literal["completions", "chat"] = (
            "chat" if endpoint_kind(headers.get(":path", "")) == "chat" else "completions")
        headers = self.trust.for_routing(headers, self.trust_gateway_headers)
        try:
            parsed = parse_request(decode_body(raw), kind)
        except BadRequestError as exc:
            return immediate(400, str(exc), exc.code, param=exc.param), None, CacheLookup()
        request = LLMRequest.from_openai(parsed, headers)
        request.allowed_addresses = subset
        lookup = (await self.response_cache.lookup(request) if self.response_cache
                  else CacheLookup())
        if lookup.hit:  # answered by Envoy from the cache: no engine, no budget
            return cached_immediate(lookup), None, lookup
        try:
            routed = await self.director.open(request, entrypoint="ext_proc")
        except RoutingError as exc:
            return immediate(exc.status, exc.message, exc.code, exc.retry_after,
                             exc.param), None, lookup
        try:
            return self._route_to(parsed.body, parsed.kind, routed), routed, lookup
        except BaseException as exc:
            routed.close(exc)
            raise

    @staticmethod
    def _route_to(body: dict[str, Any], kind: str, routed: RoutedRequest) -> Any:
        """The ``BodyResponse`` sending the request to the decision's endpoints."""
        decision = routed.decision
        addresses = [e.address for e in decision.endpoints]
        set_headers = [_header(DESTINATION_HEADER, addresses[0])]
        mutation: Any = None
        changes = upstream_changes(body, kind, decision.served_model, decision.request.max_tokens)
        if changes:
            new_body = msgspec.json.encode({**body, **changes})
            mutation = ep.BodyMutation(body=new_body)
            set_headers.append(_header("content-length", str(len(new_body))))
        common = ep.CommonResponse(header_mutation=ep.HeaderMutation(set_headers=set_headers),
                                   clear_route_cache=True)
        if mutation is not None:
            common.body_mutation.CopyFrom(mutation)
        metadata = struct_pb2.Struct()
        metadata.update({LB_NAMESPACE: {DESTINATION_HEADER: ",".join(addresses)}})
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common),
                                     dynamic_metadata=metadata)


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
    servicer = add_health(server, [SERVICE])
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await set_serving(servicer, [SERVICE])
    return server, bound
