"""The OpenAI-compatible proxy: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health`` and ``/metrics``.

Per request: parse the body, ask the director for a decision, then try the ranked endpoints in
order (at most ``spec.retries.maxAttempts``). An attempt that fails *before the first byte* —
connection refused, a 5xx status, or (for streams) no first chunk within ``perTryTimeoutMs``
while the endpoint started answering nothing else (a busy endpoint is waited on: see
``_PerTryTimer``) — moves on to the next endpoint; once a byte went to the client the stream is
committed. The answer is relayed chunk by chunk as it arrives (no buffering), with
``x-kvroute-endpoint`` naming the engine. A client that disconnects cancels the handler
(``handler_cancellation``), which closes the upstream connection, so vLLM aborts the request.
Every wait is bounded by the policy's ``requestTimeoutSeconds``.

Non-streaming answers arrive from vLLM all at once, so their first byte is their last: only
connection failures and 5xx are retried for them, and the per-try timeout does not apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.lifecycle import (
    DecisionView,
    ModelCatalog,
    Outcome,
    RequestRouter,
    RoutedRequest,
    RoutingError,
)
from kvroute_router.framework.request import LLMRequest
from kvroute_router.http1.client import ConnectionPool, UpstreamConnectError
from kvroute_router.openai.errors import BadRequestError, error_body
from kvroute_router.openai.requests import decode_body, parse_request
from kvroute_router.openai.upstream import PRIORITY_HEADER, upstream_body, usage_injected
from kvroute_router.openai.usage import (
    USAGE_TAIL,
    UsageEventFilter,
    streamed_events,
    streamed_tokens,
    usage_of,
)
from kvroute_router.proxy.openai_errors import error_response
from kvroute_router.responsecache import (
    CACHE_HEADER,
    AnswerRecorder,
    CacheLookup,
    ResponseCache,
)
from kvroute_router.trust import NAMESPACE_HEADER, HeaderTrust

log = logging.getLogger(__name__)


class _ClientFramingFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (bad framing: ``Content-Length`` with
    ``Transfer-Encoding``, a bad chunk size, an invalid method or header) at ERROR with a
    traceback, though it answers the client 400 and nothing on the router failed. Such a record
    becomes one WARNING line without the traceback: ERROR stays for the router's own faults."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, aiohttp.http_exceptions.HttpProcessingError) and (
                exc.code is None or 400 <= exc.code < 500):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = f"{record.msg}: malformed HTTP request answered %s (%s)"
            record.args = (*(record.args if isinstance(record.args, tuple) else ()),
                           exc.code or 400, exc.message.strip().splitlines()[0]
                           if exc.message.strip() else type(exc).__name__)
            record.exc_info, record.exc_text = None, None
        return True


HTTP_PROTOCOL_LOG = logging.getLogger(f"{__name__}.http")
"""The logger the router's HTTP servers hand aiohttp (``logger=``): aiohttp's protocol errors,
client framing faults downgraded to WARNING."""
HTTP_PROTOCOL_LOG.addFilter(_ClientFramingFilter())

ENDPOINT_HEADER = "x-kvroute-endpoint"
POOL_HEADER = "x-kvroute-pool"
MAX_BODY_BYTES = 32 * 1024 * 1024
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
})
PASS_BACK = ("content-type", "content-encoding", "cache-control", "x-request-id")
ERROR_BODY_LIMIT = 64 * 1024
ADMISSION_TIMEOUT_S = 600.0


class _RelayResponse(web.StreamResponse):
    """A relayed answer: its head goes out with its first bytes, in one send.

    A plain ``StreamResponse`` sends its head on ``prepare`` and every chunk, and the chunked
    terminator, in sends of their own — two more sends per answer than needed, ~0.15 ms of
    router CPU each on loopback (docs/benchmarks/router-cpu.md, *Round 6*). aiohttp buffers
    the head until the first write when this class attribute is false (as ``web.Response``
    does); the relay also ends the answer with ``write_eof(last bytes)``, one send for the last
    chunk and the terminator. Should aiohttp drop the attribute, the head is sent on its own
    again: slower, not wrong."""

    _send_headers_immediately = False


class UpstreamAttemptError(Exception):
    """An attempt failed before the first byte reached the client."""

    def __init__(self, message: str, status: int = 0, timed_out: bool = False,
                 body: bytes = b"", content_type: str = "application/json") -> None:
        super().__init__(message)
        self.status = status
        self.timed_out = timed_out
        self.body = body
        self.content_type = content_type


class OpenAIProxy:
    """The aiohttp application and its pooled upstream client."""

    def __init__(self, director: RequestRouter, datastore: ModelCatalog,
                 connect_timeout_s: float = 2.0, unavailable_for_s: float = 2.0,
                 trust_tenant_header: bool = False,
                 response_cache: ResponseCache | None = None,
                 trusted_proxy_cidrs: Iterable[str] = ()) -> None:
        self.director = director
        self.response_cache = response_cache
        self.datastore = datastore
        self.trust = HeaderTrust(datastore, trusted_proxy_cidrs, trust_all=trust_tenant_header)
        """Trust-gated headers (tenant, priority, scope, match headers) are believed only
        from the trusted proxies (every client with ``trust_tenant_header``)."""
        self.connect_timeout_s = connect_timeout_s
        self.unavailable_for_s = unavailable_for_s
        self._upstream: ConnectionPool | None = None
        self.app = web.Application(client_max_size=MAX_BODY_BYTES,
                                   middlewares=[self._error_middleware])
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.on_startup.append(self._open)
        self.app.on_cleanup.append(self._close)

    async def _open(self, app: web.Application) -> None:
        self._upstream = ConnectionPool(connect_timeout_s=self.connect_timeout_s)

    async def _close(self, app: web.Application) -> None:
        if self._upstream is not None:
            self._upstream.close()

    @web.middleware
    async def _error_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = {404: f"Unknown path {request.path}",
                       405: f"Method {request.method} is not allowed on {request.path}",
                       413: f"Request body larger than {MAX_BODY_BYTES} bytes"}.get(
                exc.status, exc.reason)
            return error_response(exc.status, message, exc.reason.lower().replace(" ", "_"))

    # ---- simple endpoints ----------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        # The namespace scope (docs/security.md) counts only from a trusted hop.
        trusted = self.trust.peer_trusted(request.remote)
        scope = request.headers.get(NAMESPACE_HEADER) if trusted else None
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "kvroute"}
                for name in self.datastore.models(scope or None)]
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        endpoints = self.datastore.endpoints()
        healthy = sum(1 for ep in endpoints if ep.healthy())
        return web.json_response({"status": "ok", "loaded": self.datastore.loaded,
                                  "endpoints": len(endpoints), "healthy_endpoints": healthy})

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.director.metrics_registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- inference ---------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions", "/v1/completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat", "/v1/chat/completions")

    async def _serve(self, http: web.Request, kind: Literal["completions", "chat"], path: str
                     ) -> web.StreamResponse:
        try:
            raw = await http.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"Request body larger than {MAX_BODY_BYTES} bytes",
                                  "request_too_large")
        trusted = self.trust.peer_trusted(http.remote)
        headers = self.trust.for_routing({k.lower(): v for k, v in http.headers.items()},
                                         trusted)
        try:
            parsed = parse_request(decode_body(raw), kind)
        except BadRequestError as exc:
            return error_response(400, str(exc), exc.code, exc.param)
        llm_request = LLMRequest.from_openai(parsed, headers)
        lookup = (await self.response_cache.lookup(llm_request) if self.response_cache
                  else CacheLookup())
        if lookup.hit:  # answered before routing: no engine, no admission, no budget
            cached, content_type = lookup.body()
            return web.Response(body=cached, content_type=content_type,
                                headers={CACHE_HEADER: str(lookup.match)})
        started = time.monotonic()
        try:
            # asyncio.timeout, not wait_for: open() must run in this task (it dispatches the
            # first attempt right after routing; see framework/lifecycle.py).
            async with asyncio.timeout(ADMISSION_TIMEOUT_S):
                routed = await self.director.open(llm_request)
        except RoutingError as exc:
            return error_response(exc.status, exc.message, exc.code, exc.param,
                                  retry_after=exc.retry_after)
        except TimeoutError:
            return error_response(504, "Timed out waiting for admission", "timeout")
        async with routed:
            decision = routed.decision
            deadline = started + decision.request_timeout_s
            strip_usage = usage_injected(parsed.body)
            # One body for every attempt: a retry carries the first endpoint's priority.
            priority = decision.engine_priority(decision.endpoints[0])
            payload = upstream_body(raw, parsed.body, parsed.kind, decision.served_model,
                                    llm_request.max_tokens, request_usage=True,
                                    priority=priority)
            upstream_headers = [(k, v) for k, v in http.headers.items()
                                if (name := k.lower()) not in HOP_BY_HOP and name != "x-request-id"
                                and self.trust.forwardable(name, trusted)
                                and (priority is None or name != PRIORITY_HEADER)]
            upstream_headers.append(("x-request-id", llm_request.request_id))
            if http.headers.get("content-type") is None:
                upstream_headers.append(("content-type", "application/json"))
            return await self._relay(http, routed, path, payload, upstream_headers, started,
                                     deadline, lookup, strip_usage)

    async def _relay(self, http: web.Request, routed: RoutedRequest, path: str,
                     payload: bytes, headers: Sequence[tuple[str, str]], started: float,
                     deadline: float, lookup: CacheLookup, strip_usage: bool = False
                     ) -> web.StreamResponse:
        decision = routed.decision
        attempts = decision.endpoints[:max(1, decision.max_attempts)]
        last_error: UpstreamAttemptError | None = None
        for number, endpoint in enumerate(attempts):
            if time.monotonic() >= deadline:
                break
            if number > 0:  # the first attempt was dispatched by open()
                self.director.count_retry(decision)
                routed.dispatch(endpoint)
            # The endpoint may still be computing this prompt's prefix for an earlier
            # request: wait until it is cached rather than have it computed twice.
            await routed.wait_for_prefill(min(decision.prefill_wait_s,
                                              deadline - time.monotonic()))
            try:
                return await self._attempt(http, routed, endpoint, path, payload, headers,
                                           started, deadline, lookup, strip_usage)
            except UpstreamAttemptError as exc:
                last_error = exc
                log.info("attempt %d of %s on %s failed: %s", number + 1,
                         decision.request.request_id, endpoint.address, exc)
        if last_error is not None and last_error.status >= 500 and last_error.body:
            routed.finish(attempts[-1], Outcome(status=last_error.status))
            return web.Response(status=last_error.status, body=last_error.body,
                                content_type=last_error.content_type.split(";")[0],
                                headers={ENDPOINT_HEADER: attempts[-1].address})
        timed_out = last_error is None or last_error.timed_out
        status = 504 if timed_out else 503
        routed.finish(None, Outcome(status=status, error=str(last_error)))
        message = (f"No endpoint answered in time ({len(attempts)} attempt(s))" if timed_out
                   else f"Every endpoint tried failed ({len(attempts)} attempt(s)): "
                        f"{last_error}")
        return error_response(status, message, "timeout" if timed_out else "upstream_failed")

    async def _attempt(self, http: web.Request, routed: RoutedRequest, endpoint: Endpoint,
                       path: str, payload: bytes, headers: Sequence[tuple[str, str]],
                       started: float,
                       deadline: float, lookup: CacheLookup, strip_usage: bool = False
                       ) -> web.StreamResponse:
        """One attempt on ``endpoint`` (already dispatched); finishes the request once a byte
        went to the client, raises UpstreamAttemptError before that. ``strip_usage``: the
        router asked for the stream's usage event, the client did not: it is dropped from the
        relayed bytes (and still read from the raw tail)."""
        assert self._upstream is not None
        decision: DecisionView = routed.decision
        stream = decision.request.stream
        status = 0
        ttft: float | None = None
        relayed = _Relayed(stream)
        broken: str | None = None
        try:
            try:
                async with asyncio.timeout_at(_loop_time(deadline)) as timer, (
                        _PerTryTimer(timer, endpoint, decision.per_try_timeout_s,
                                     lambda: self.director.count_per_try_extension(decision))
                        if stream else contextlib.nullcontext()):
                    upstream = await self._upstream.request(endpoint.address, "POST", path,
                                                            headers, payload)
                    try:
                        status = upstream.status
                        if status >= 500:
                            body = await upstream.read(ERROR_BODY_LIMIT)
                            raise UpstreamAttemptError(
                                f"HTTP {status}", status=status, body=body,
                                content_type=upstream.headers.get("content-type",
                                                                  "application/json"))
                        first = await upstream.read_some()
                    except BaseException:
                        upstream.release()
                        raise
            except TimeoutError as exc:
                raise UpstreamAttemptError("no first byte in time", timed_out=True) from exc
            except UpstreamConnectError as exc:
                self.director.mark_unavailable(endpoint, self.unavailable_for_s)
                raise UpstreamAttemptError(f"cannot connect: {exc}") from exc
            except OSError as exc:
                raise UpstreamAttemptError(f"{type(exc).__name__}: {exc}") from exc

            # Committed: from here on the client gets this endpoint's answer.
            routed.answering()  # the first byte: the prompt is computed (prefill backlog)
            response = _RelayResponse(status=status)
            recorder = relayed.recorder = lookup.recorder()
            if strip_usage:
                relayed.usage_filter = UsageEventFilter()
            try:
                ttft = time.monotonic() - started
                for name in PASS_BACK:
                    if name in upstream.headers:
                        response.headers[name] = upstream.headers[name]
                response.headers[ENDPOINT_HEADER] = endpoint.address
                response.headers[POOL_HEADER] = decision.pool_name
                if lookup.header is not None:
                    response.headers[CACHE_HEADER] = lookup.header
                await response.prepare(http)
                sink = _splicer(http, response, relayed)  # None: this task relays every piece
                head_sent = False
                out = relayed.take(first)
                async with asyncio.timeout_at(_loop_time(deadline)):
                    # Each piece is written as it arrives; the one the answer ends with goes
                    # out with the chunked terminator (write_eof), in one send. Once the head
                    # went out, the pieces between are spliced: written from the upstream
                    # connection's data_received, with no wake-up of this task per piece.
                    while not upstream.complete:
                        if out:
                            await response.write(out)
                            head_sent = True
                        if sink is not None and head_sent and _writable(http):
                            upstream.splice(sink)
                        chunk = await upstream.read_some()
                        out = relayed.take(chunk)
                if relayed.usage_filter is not None and (rest := relayed.usage_filter.flush()):
                    out += rest
                await response.write_eof(out)
            except TimeoutError:
                log.warning("request %s exceeded its deadline mid-stream on %s",
                            decision.request.request_id, endpoint.address)
                status = 504
                broken = "the request's deadline passed while the answer was streaming"
            except OSError as exc:
                log.warning("stream of %s on %s broke: %s", decision.request.request_id,
                            endpoint.address, exc)
                status = 502 if status < 400 else status
                broken = f"the engine's answer broke off ({type(exc).__name__})"
            finally:
                upstream.release()
            if broken is not None:
                await _cut_short(http, response, stream, broken)
            lookup.finish(recorder, status)  # written only when complete and successful
            prompt_tokens, completion_tokens = usage_of(relayed.tail)
            if completion_tokens is None and stream:
                completion_tokens = streamed_tokens(relayed.events, decision.request.kind)
            routed.finish(endpoint, Outcome(
                status=status, ttft_s=ttft if stream else None,
                e2e_s=time.monotonic() - started, prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens, answered=True))
            return response
        except asyncio.CancelledError:
            counted = (streamed_tokens(relayed.events, decision.request.kind)
                       if stream and ttft else None)
            routed.finish(endpoint, Outcome(status=499, completion_tokens=counted,
                                            error="client disconnected",
                                            answered=ttft is not None))
            raise
        finally:
            routed.end_attempt()


class _PerTryTimer:
    """A stream attempt's per-try timeout (``retries.perTryTimeoutMs``), inside the request's
    deadline ``timer``: it ends the attempt (the timer fires at once) only when ``period_s``
    passed with no first byte *and* the endpoint started answering nothing else in that time.
    An endpoint whose :attr:`Endpoint.answers_started` moved is busy, not stuck — this attempt
    is queued behind others, or on a priority engine behind newer ones — and sending it
    elsewhere would compute its prompt a second time and queue it again, so it waits another
    period (``extended`` counts it). A stalled engine answers nobody and is left after one
    period, two at most."""

    def __init__(self, timer: asyncio.Timeout, endpoint: Endpoint, period_s: float,
                 extended: Callable[[], None]) -> None:
        self._timer = timer
        self._endpoint = endpoint
        self._period_s = period_s
        self._extended = extended
        self._loop = asyncio.get_running_loop()
        self._seen = endpoint.answers_started
        self._handle: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> _PerTryTimer:
        self._handle = self._loop.call_later(self._period_s, self._check)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _check(self) -> None:
        if self._endpoint.answers_started != self._seen:
            self._seen = self._endpoint.answers_started
            self._extended()
            self._handle = self._loop.call_later(self._period_s, self._check)
        else:
            self._timer.reschedule(self._loop.time())


class _Relayed:
    """What a relay keeps of the answer's pieces as they pass: the response cache's copy (the
    engine's whole answer, usage included: a hit is rebuilt in the form each client asks
    for), the client's bytes (the usage event dropped when only the router asked for it), the
    streamed events counted and the answer's tail (its usage)."""

    __slots__ = ("events", "recorder", "stream", "tail", "usage_filter")

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.recorder: AnswerRecorder | None = None
        self.usage_filter: UsageEventFilter | None = None
        self.events = 0
        self.tail = b""

    def take(self, piece: bytes) -> bytes:
        """Account for ``piece`` of the engine's answer; the bytes the client gets for it."""
        if self.recorder is not None:
            self.recorder.feed(piece)
        if self.stream:
            self.events += streamed_events(self.tail, piece)
        tail = self.tail + piece
        self.tail = tail[-USAGE_TAIL:] if len(tail) > USAGE_TAIL else tail
        return self.usage_filter.feed(piece) if self.usage_filter is not None else piece


SPLICE_HIGH_WATER = 64 * 1024
"""Bytes waiting in the client's socket buffer at which splicing stops (the relay's
``await response.write`` waits for a slow client instead; splicing resumes once it drained)."""


def _splicer(http: web.Request, response: web.StreamResponse, relayed: _Relayed
             ) -> Callable[[bytes], bool] | None:
    """The splice callback (:meth:`UpstreamResponse.splice`) writing an answer's pieces to the
    client's transport in the chunked framing its head announced (after ``prepare``); ``None``
    when the answer is not sent chunked and uncompressed (an HTTP/1.0 client), which is relayed
    piece by piece. Spliced only after the head went out (it leaves with the first bytes
    written)."""
    transport = http.transport
    if (transport is None or response.compression
            or response.headers.get("Transfer-Encoding", "").lower() != "chunked"):
        return None
    write, is_closing = transport.write, transport.is_closing
    buffered = transport.get_write_buffer_size

    def sink(piece: bytes) -> bool:
        out = relayed.take(piece)
        if is_closing():  # the client left: its handler is being cancelled
            return False
        if out:
            write(b"%x\r\n%b\r\n" % (len(out), out))
        return buffered() < SPLICE_HIGH_WATER

    return sink


def _writable(http: web.Request) -> bool:
    """The client's transport is open and takes writes without waiting."""
    transport = http.transport
    return (transport is not None and not transport.is_closing()
            and transport.get_write_buffer_size() < SPLICE_HIGH_WATER)


async def _cut_short(http: web.Request, response: web.StreamResponse, stream: bool,
                     reason: str) -> None:
    """The answer broke off after it was committed to the client: never let it look complete.
    A stream gets an OpenAI error event (no ``[DONE]``); then the connection is cut without the
    final chunk, so any HTTP client sees an incomplete body rather than a clean end."""
    if stream:
        event = b"data: " + error_body(502, reason, "upstream_stream_broken") + b"\n\n"
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(event)
    transport = http.transport
    if transport is not None:
        transport.abort()


def _loop_time(monotonic_deadline: float) -> float:
    """A ``time.monotonic()`` deadline on the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())


__all__ = ["ENDPOINT_HEADER", "OpenAIProxy"]
