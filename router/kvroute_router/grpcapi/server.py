"""The ``kvroute.v1.Router`` gRPC service: ``Pick`` routes a request through the director and
returns the endpoint (plus fallbacks and the scores behind the choice); ``Report`` closes the
decision with its outcome. A picked request counts as in flight on its endpoint until it is
reported or its policy's ``requestTimeoutSeconds`` passes (so a sidecar that never reports
cannot inflate the load forever). Served beside ``grpc.health.v1``.

Errors map to gRPC codes: unknown model → NOT_FOUND, bad input → INVALID_ARGUMENT, prompt too
large → OUT_OF_RANGE, shed → RESOURCE_EXHAUSTED (``retry-after`` trailing metadata), no
endpoint → UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any, Literal

import grpc

from kvroute_router.framework.lifecycle import Outcome, RequestRouter, RoutedRequest, RoutingError
from kvroute_router.framework.request import LLMRequest
from kvroute_router.grpc_health import add_health, set_serving
from kvroute_router.grpcauth import BearerAuthInterceptor, CallerTokens
from kvroute_router.openai.errors import BadRequestError
from kvroute_router.openai.requests import MAX_COUNT, render_chat_prompt
from kvroute_router.proto_gen import router_pb2 as pb
from kvroute_router.trust import HeaderTrust, PolicyCatalog

SERVICE = "kvroute.v1.Router"
MAX_PENDING = 100_000
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.OUT_OF_RANGE,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def request_from_pick(message: pb.PickRequest) -> LLMRequest:
    """The routing view of a Pick; BadRequestError names a field out of range."""
    if not message.model:
        raise BadRequestError("model is required", "model")
    if message.max_tokens > MAX_COUNT:
        raise BadRequestError(f"max_tokens must be at most {MAX_COUNT}", "max_tokens")
    headers = {k.lower(): v for k, v in message.headers.items()}
    which = message.WhichOneof("input")
    text: str = ""
    tokens: list[int] | None = None
    if which == "prompt":
        text = message.prompt
    elif which == "messages":
        text = render_chat_prompt([{"role": m.role, "content": m.content}
                                   for m in message.messages.messages])
    elif which == "token_ids":
        tokens = list(message.token_ids.ids)
    request = LLMRequest(model=message.model, kind="pick", prompt_text=text, token_ids=tokens,
                         tenant=message.tenant or None, headers=headers,
                         max_tokens=message.max_tokens or None)
    if message.request_id:
        request.request_id = message.request_id
    return request


class RouterService:
    """Pick/Report handlers and the table of decisions awaiting a Report."""

    def __init__(self, director: RequestRouter, catalog: PolicyCatalog,
                 tokens: CallerTokens | None = None) -> None:
        self.director = director
        self.tokens = tokens
        """Caller tokens: an authenticated caller is the request's tenant and its Reports
        are believed; without tokens every caller is anonymous (docs/security.md)."""
        self.trust = HeaderTrust(catalog)
        self.pending: dict[str, tuple[RoutedRequest, float, str | None]] = {}
        """decision id → the routed request awaiting its Report, its deadline, its caller."""

    def _caller(self, context: Any) -> str | None:
        if self.tokens is None:
            return None
        return self.tokens.caller_of(context.invocation_metadata())

    async def pick(self, message: pb.PickRequest, context: Any) -> pb.PickResponse:
        try:
            request = request_from_pick(message)
        except BadRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{exc} (param: {exc.param})" if exc.param else str(exc))
            raise  # abort raises; this keeps type checkers aware
        caller = self._caller(context)
        if caller is not None and message.tenant and message.tenant != caller:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"caller '{caller}' may only pick for its own tenant, not "
                                f"'{message.tenant}' (leave tenant empty)")
        request.tenant = caller  # anonymous: the policy's default tenant
        request.headers = self.trust.for_routing(request.headers, trusted=caller is not None)
        try:
            routed = await self.director.open(request, entrypoint="grpc")
        except RoutingError as exc:
            if exc.retry_after is not None:
                context.set_trailing_metadata((("retry-after", str(exc.retry_after)),))
            await context.abort(STATUS_CODES.get(exc.status, grpc.StatusCode.UNKNOWN),
                                exc.message)
            raise  # abort raises; this keeps type checkers aware
        try:
            decision_id = uuid.uuid4().hex
            self._expire(time.monotonic())
            self.pending[decision_id] = (
                routed, time.monotonic() + routed.decision.request_timeout_s, caller)
            return self._answer(routed, decision_id)
        except BaseException as exc:
            self.pending.pop(decision_id, None)
            routed.close(exc)
            raise

    @staticmethod
    def _answer(routed: RoutedRequest, decision_id: str) -> pb.PickResponse:
        decision = routed.decision
        endpoint = decision.endpoints[0]
        ratio = decision.prefix_match_ratio(endpoint)
        answer = pb.PickResponse(
            endpoint=endpoint.address, endpoint_name=endpoint.name,
            fallbacks=[e.address for e in decision.endpoints[1:]],
            pool=decision.pool_name, policy=decision.policy_name,
            target_model=decision.served_model, decision_id=decision_id,
            reasons=decision.reasons(),
            scores=[pb.EndpointScore(endpoint=s.endpoint.name, address=s.endpoint.address,
                                     total=s.total, scores=s.by_scorer)
                    for s in decision.ranked],
            prefix_match_ratio=ratio or 0.0)
        priority = decision.engine_priority(endpoint)
        if priority is not None:  # the caller sends it (the field is unset for FCFS engines)
            answer.engine_priority = priority
        return answer

    async def report(self, message: pb.ReportRequest, context: Any) -> pb.ReportResponse:
        entry = self.pending.get(message.decision_id)
        caller = self._caller(context)
        if entry is None or entry[2] != caller:  # only the caller that picked may report
            return pb.ReportResponse(accepted=False)
        self.pending.pop(message.decision_id, None)
        routed, _, _ = entry
        endpoint = routed.decision.endpoints[0]
        # An authenticated caller's report is believed (0 tokens: nothing produced); an
        # anonymous one is not: the reservation is billed (budget/accounting.py).
        witness: Literal["caller", "unverified"] = (
            "caller" if caller is not None else "unverified")
        served = endpoint
        if message.endpoint and message.endpoint != endpoint.address:
            served = next((e for e in routed.decision.endpoints
                           if e.address == message.endpoint), endpoint)
        routed.finish(served, Outcome(
            status=message.status, ttft_s=message.ttft_seconds or None,
            e2e_s=message.e2e_seconds or None,
            prompt_tokens=message.prompt_tokens if witness == "caller" else None,
            completion_tokens=message.completion_tokens if witness == "caller" else None,
            witness=witness))
        return pb.ReportResponse(accepted=True)

    def _expire(self, now: float) -> None:
        """Close decisions past their deadline; cap the table's size."""
        if not self.pending:
            return
        expired = [k for k, (_, deadline, _) in self.pending.items() if deadline < now]
        overflow = len(self.pending) - len(expired) - MAX_PENDING
        if overflow > 0:
            expired.extend(list(self.pending)[:overflow])
        for key in expired:
            entry = self.pending.pop(key, None)
            if entry is not None:
                routed, _, _ = entry
                routed.finish(routed.decision.endpoints[0], Outcome(
                    status=0, error="not reported", witness="unverified"))

    async def expire_forever(self, period_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(period_s)
            self._expire(time.monotonic())


class RouterServer:
    """A running native gRPC server and its background expiry task."""

    def __init__(self, server: Any, service: RouterService, task: asyncio.Task[None]) -> None:
        self.server = server
        self.service = service
        self.task = task

    async def stop(self, grace: float | None = None) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.server.stop(grace)


async def start_router_grpc_server(director: RequestRouter, host: str, port: int, *,
                                   catalog: PolicyCatalog, tokens: CallerTokens | None = None
                                   ) -> tuple[RouterServer, int]:
    """With ``tokens``, Pick/Report need a caller token and the caller is the tenant."""
    interceptors = [BearerAuthInterceptor(tokens, [SERVICE])] if tokens is not None else []
    server = grpc.aio.server(interceptors=interceptors)
    service = RouterService(director, catalog, tokens)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Pick": grpc.unary_unary_rpc_method_handler(
            service.pick, request_deserializer=pb.PickRequest.FromString,
            response_serializer=pb.PickResponse.SerializeToString),
        "Report": grpc.unary_unary_rpc_method_handler(
            service.report, request_deserializer=pb.ReportRequest.FromString,
            response_serializer=pb.ReportResponse.SerializeToString),
    }),))
    servicer = add_health(server, [SERVICE])
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await set_serving(servicer, [SERVICE])
    task = asyncio.get_running_loop().create_task(service.expire_forever(), name="pick-expiry")
    return RouterServer(server, service, task), bound
