"""The HTTP face of one emulated engine: vLLM's OpenAI server as clients and routers see it.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming with vLLM's SSE
framing — one ``data:`` chunk per step's new tokens, ``finish_reason`` on the last one, the
usage chunk with ``stream_options.include_usage``, then ``data: [DONE]`` — or one JSON
answer), ``GET /v1/models``, ``GET /health``, ``POST /tokenize``, ``POST /detokenize``,
``POST /reset_prefix_cache``, ``GET /metrics``, ``GET /version``. Bodies and error bodies
have the fields a vLLM 0.32 answer has (``tests/e2e/test_emulator_fidelity.py`` compares).
A request's ``priority`` (body field or ``X-Vllm-Priority`` header) orders the engine's waiting
queue when the fleet runs vLLM's ``priority`` scheduling policy; ``fcfs`` ignores it.

Decisions where vLLM's behaviour depends on the weights: the output text is the filler of
:mod:`~kvroute_emulator.tokens`; without ``max_tokens`` a completion generates 16 tokens (the
OpenAI default vLLM applies) and a chat answer runs to the context limit, unless the fleet was
started with ``eos_after`` (then a request that does not set ``ignore_eos`` stops with
``finish_reason: "stop"`` after that many tokens, standing in for the EOS a model emits).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kvroute_emulator import metrics
from kvroute_emulator.engine import EmulatedEngine, EngineUnavailableError, Generation
from kvroute_emulator.tokens import ChatTemplateError

VLLM_VERSION = "0.32.0"
FINGERPRINT = f"vllm-{VLLM_VERSION}-kvroute-emulator"
COMPLETION_DEFAULT_MAX_TOKENS = 16
PRIORITY_HEADER = "X-Vllm-Priority"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class ClientError(Exception):
    """A request vLLM would answer with a 4xx: OpenAI error body naming ``param``."""

    def __init__(self, message: str, param: str | None, status: int = 400,
                 kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def response(self) -> web.Response:
        return _json({"error": {"message": self.message, "type": self.kind,
                                "param": self.param, "code": self.status}}, self.status)


def _dumps(body: Any) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=_dumps(body), status=status, content_type="application/json")


def _sse(body: Any) -> bytes:
    return f"data: {_dumps(body)}\n\n".encode()


async def _read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise ClientError("the request body is not valid JSON", "body") from None
    if not isinstance(body, dict):
        raise ClientError("the request body must be a JSON object", "body")
    return body


def _int_param(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClientError(f"{name} must be an integer, got {value!r}.", name)
    return value


def _bool_param(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ClientError(f"{name} must be a boolean, got {value!r}.", name)
    return value


class RequestTimings:
    """When each streamed request reached its engine's handler and when its first token was
    written, by the request's ``x-request-id`` (``time.monotonic()``, the clock every process
    of the machine shares): a benchmark subtracts this engine time from what its client saw to
    find what a router in between added (``GET /timings`` on the admin port, which empties
    it). Requests without an ``x-request-id`` are not recorded; the oldest go past ``limit``."""

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._seen: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def record(self, key: str | None, arrived: float) -> None:
        """The first token of the request ``key`` (its x-request-id) that reached the
        handler at ``arrived`` is being written now."""
        if not key:
            return
        self._seen[key] = (arrived, time.monotonic())
        if len(self._seen) > self.limit:
            self._seen.popitem(last=False)

    def take(self) -> dict[str, tuple[float, float]]:
        taken, self._seen = dict(self._seen), OrderedDict()
        return taken


class EngineServer:
    """Routes of one emulated engine (the aiohttp app)."""

    def __init__(self, engine: EmulatedEngine, eos_after: int = 0,
                 timings: RequestTimings | None = None) -> None:
        self.engine = engine
        self.model = engine.model
        self.eos_after = eos_after
        self.timings = timings
        self.app = web.Application(client_max_size=64 * 1024 * 1024,
                                   middlewares=[self._errors])
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_post("/tokenize", self.tokenize)
        self.app.router.add_post("/detokenize", self.detokenize)
        self.app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/metrics/", self.metrics_restricted)
        self.app.router.add_get("/version", self.version)

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ClientError as exc:
            return exc.response()
        except EngineUnavailableError as exc:
            if request.transport is not None:
                request.transport.abort()
            return _json({"error": {"message": str(exc), "type": "ServiceUnavailable",
                                    "param": None, "code": 503}}, 503)

    # --- shared parsing ------------------------------------------------------------------

    def _check_model(self, body: dict[str, Any]) -> None:
        name = body.get("model")
        if name is not None and name != self.model.name:
            raise ClientError(f"The model `{name}` does not exist. Valid aliases: "
                              f"{self.model.name}.", "model", 404, "NotFoundError")

    def _max_tokens(self, body: dict[str, Any], prompt_len: int, chat: bool) -> int:
        limit = self.model.max_model_len
        if prompt_len > limit:
            raise ClientError(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"contains at least {prompt_len} input tokens, which exceeds this limit even "
                f"without any output tokens. Please reduce the length of the input prompt. "
                f"(parameter=input_tokens, value={prompt_len})", "input_tokens")
        name = "max_tokens"
        value = _int_param(body, "max_tokens")
        if chat and body.get("max_completion_tokens") is not None:
            name, value = "max_completion_tokens", _int_param(body, "max_completion_tokens")
        if value is None:
            value = limit - prompt_len if chat else COMPLETION_DEFAULT_MAX_TOKENS
            value = max(1, min(value, limit - prompt_len))
        if value < 1:
            raise ClientError(f"{name} must be at least 1, got {value}. "
                              f"(parameter={name}, value={value})", name)
        if prompt_len + value > limit:
            raise ClientError(
                f"'{name}' is too large: {value}. This model's maximum context length is "
                f"{limit} tokens and your request has {prompt_len} input tokens "
                f"({value} > {limit} - {prompt_len}). (parameter={name}, value={value})", name)
        return value

    def _prompt_ids(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.model.encode_prompt(prompt)
        if (isinstance(prompt, list) and prompt
                and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            vocab = self.model.tokenizer.get_vocab_size()
            if any(t < 0 or t >= vocab for t in prompt):
                raise ClientError(f"token ids must be in [0, {vocab})", "prompt")
            return list(prompt)
        raise ClientError("prompt must be a string, a list of token ids, or a list holding "
                          "one of those (one prompt per request here)", "prompt")

    def _chat_ids(self, body: dict[str, Any]) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ClientError("messages must be a non-empty list", "messages")
        flat: list[dict[str, Any]] = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ClientError(f"messages[{i}] must be an object with a string role",
                                  "messages")
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts: vLLM joins the text parts
                texts = [p.get("text") for p in content if isinstance(p, dict)]
                if not all(isinstance(t, str) for t in texts) or len(texts) != len(content):
                    raise ClientError(f"messages[{i}].content: only text parts are supported",
                                      "messages")
                content = "\n".join(t for t in texts if isinstance(t, str))
            if content is not None and not isinstance(content, str):
                raise ClientError(f"messages[{i}].content must be a string or text parts",
                                  "messages")
            flat.append({**message, "content": content or ""})
        add_generation_prompt = _bool_param(body, "add_generation_prompt", True)
        try:
            return self.model.encode_chat(flat, add_generation_prompt)
        except ChatTemplateError as exc:
            raise ClientError(str(exc), "messages") from None

    @staticmethod
    def _priority(request: web.Request, body: dict[str, Any]) -> int:
        """The request's scheduling priority, as vLLM reads it: the body's ``priority`` (an
        int64, 0 when absent; ``null`` is refused, the field is not optional there), unless an
        ``X-Vllm-Priority`` header holds an integer (one that does not is ignored). Only the
        priority policy orders by it; fcfs accepts and ignores it, as vLLM does."""
        value = body.get("priority", 0)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ClientError(f"priority must be an integer, got {value!r}.", "priority")
        if not INT64_MIN <= value <= INT64_MAX:
            raise ClientError(f"priority must be in [{INT64_MIN}, {INT64_MAX}], got {value}. "
                              f"(parameter=priority, value={value})", "priority")
        header = request.headers.get(PRIORITY_HEADER)
        if header is not None:
            with contextlib.suppress(ValueError):
                return int(header)
        return value

    def _common(self, body: dict[str, Any]) -> tuple[bool, bool, bool]:
        n = _int_param(body, "n")
        if n is not None and n != 1:
            raise ClientError("the emulator serves n=1 only", "n")
        stream = _bool_param(body, "stream", False)
        options = body.get("stream_options")
        include_usage = False
        if options is not None:
            if not isinstance(options, dict):
                raise ClientError("stream_options must be an object", "stream_options")
            if not stream:
                raise ClientError("Stream options can only be defined when `stream=True`.",
                                  "stream_options")
            include_usage = _bool_param(options, "include_usage", False)
        ignore_eos = _bool_param(body, "ignore_eos", False)
        return stream, include_usage, ignore_eos

    # --- generation ----------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await _read_json(request)
        self._check_model(body)
        stream, include_usage, ignore_eos = self._common(body)
        priority = self._priority(request, body)
        ids = self._prompt_ids(body)
        max_tokens = self._max_tokens(body, len(ids), chat=False)
        return await self._generate(request, ids, max_tokens, ignore_eos, stream,
                                    include_usage, chat=False, arrived=arrived,
                                    priority=priority)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await _read_json(request)
        self._check_model(body)
        stream, include_usage, ignore_eos = self._common(body)
        priority = self._priority(request, body)
        ids = self._chat_ids(body)
        max_tokens = self._max_tokens(body, len(ids), chat=True)
        return await self._generate(request, ids, max_tokens, ignore_eos, stream,
                                    include_usage, chat=True, arrived=arrived,
                                    priority=priority)

    async def _generate(self, request: web.Request, ids: list[int], max_tokens: int,
                        ignore_eos: bool, stream: bool, include_usage: bool,
                        chat: bool, arrived: float = 0.0,
                        priority: int = 0) -> web.StreamResponse:
        stop_early = bool(self.eos_after) and not ignore_eos and self.eos_after < max_tokens
        length = self.eos_after if stop_early else max_tokens
        gen = self.engine.submit(ids, length, priority)
        reason = "stop" if stop_early else "length"
        request_id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(8)
        created = int(time.time())
        try:
            if stream:
                return await self._stream(request, gen, request_id, created, reason, chat,
                                          include_usage, arrived)
            return await self._whole(request, gen, request_id, created, reason, chat)
        finally:
            if not gen.done:
                self.engine.abort(gen)

    async def _next(self, request: web.Request, gen: Generation) -> bool:
        """Wait for the engine's next update; False when the engine was killed."""
        update = await gen.updates.get()
        if update == "killed":
            if request.transport is not None:
                request.transport.abort()
            return False
        return True

    @staticmethod
    def _cut(request: web.Request, gen: Generation) -> None:
        """A killed engine's connections end mid-answer, as a crashed process's do."""
        if gen.finish_reason == "killed" and request.transport is not None:
            request.transport.abort()

    def _usage(self, gen: Generation) -> dict[str, Any]:
        prompt, done = len(gen.prompt_ids), gen.delivered
        return {"prompt_tokens": prompt, "total_tokens": prompt + done,
                "completion_tokens": done}

    async def _whole(self, request: web.Request, gen: Generation, request_id: str,
                     created: int, reason: str, chat: bool) -> web.StreamResponse:
        while not gen.done:
            if not await self._next(request, gen):
                return web.Response(status=503)
        if gen.finish_reason in ("abort", "killed"):
            self._cut(request, gen)
            return web.Response(status=503)
        text = self.model.decode(gen.output_ids[:gen.delivered])
        usage = {**self._usage(gen), "prompt_tokens_details": None,
                 "completion_tokens_details": None}
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None,
                            "annotations": None, "audio": None, "function_call": None,
                            "reasoning": None},
                "logprobs": None, "finish_reason": reason, "stop_reason": None,
                "token_ids": None, "routed_experts": None}
            return _json({"id": request_id, "object": "chat.completion", "created": created,
                          "model": self.model.name, "choices": [choice],
                          "service_tier": None, "system_fingerprint": FINGERPRINT,
                          "usage": usage, "prompt_logprobs": None, "prompt_token_ids": None,
                          "prompt_text": None, "kv_transfer_params": None,
                          "ec_transfer_params": None, "metrics": None})
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason,
                  "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                  "prompt_token_ids": None, "routed_experts": None}
        return _json({"id": request_id, "object": "text_completion", "created": created,
                      "model": self.model.name, "choices": [choice], "service_tier": None,
                      "system_fingerprint": FINGERPRINT, "usage": usage,
                      "kv_transfer_params": None, "ec_transfer_params": None,
                      "metrics": None})

    async def _stream(self, request: web.Request, gen: Generation, request_id: str,
                      created: int, reason: str, chat: bool,
                      include_usage: bool, arrived: float = 0.0) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        head = {"id": request_id,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": self.model.name}
        sent = 0
        first = True
        recorded = False
        while True:
            if gen.finish_reason in ("abort", "killed"):
                self._cut(request, gen)
                return response
            if sent >= gen.delivered:
                if gen.done:
                    break
                if not await self._next(request, gen):
                    return response
                continue
            upto = gen.delivered
            text = self.model.decode(gen.output_ids[sent:upto])
            sent = upto
            last = gen.done
            if chat and first:
                await response.write(_sse({
                    **head, "choices": [{"index": 0,
                                         "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}],
                    "prompt_token_ids": None, "prompt_text": None}))
            first = False
            if chat:
                choice: dict[str, Any] = {"index": 0, "delta": {"content": text},
                                          "logprobs": None, "finish_reason": None}
                if last:
                    choice.update(finish_reason=reason, stop_reason=None)
                choice["token_ids"] = None
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None,
                          "stop_reason": None, "prompt_token_ids": None, "token_ids": None}
                if last:
                    choice["finish_reason"] = reason
            chunk: dict[str, Any] = {**head, "choices": [choice]}
            if last and not include_usage:
                chunk["system_fingerprint"] = FINGERPRINT
            if self.timings is not None and not recorded:
                recorded = True
                self.timings.record(request.headers.get("x-request-id"), arrived)
            await response.write(_sse(chunk))
        if include_usage:
            await response.write(_sse({**head, "choices": [], "usage": self._usage(gen),
                                       "system_fingerprint": FINGERPRINT}))
        await response.write(b"data: [DONE]\n\n")
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    # --- the rest of vLLM's routes -------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        return _json({"object": "list", "data": [{
            "id": self.model.name, "object": "model", "created": created, "owned_by": "vllm",
            "root": self.model.name, "parent": None, "max_model_len": self.model.max_model_len,
            "permission": [{"id": "modelperm-" + secrets.token_hex(8),
                            "object": "model_permission", "created": created,
                            "allow_create_engine": False, "allow_sampling": True,
                            "allow_logprobs": True, "allow_search_indices": False,
                            "allow_view": True, "allow_fine_tuning": False,
                            "organization": "*", "group": None, "is_blocking": False}]}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": VLLM_VERSION})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        self._check_model(body)
        if "messages" in body:
            ids = self._chat_ids(body)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise ClientError("prompt must be a string", "prompt")
            add_special = _bool_param(body, "add_special_tokens", True)
            ids = list(self.model.tokenizer.encode(prompt, add_special_tokens=add_special).ids)
        strs = ([self.model.token_str(t) for t in ids]
                if _bool_param(body, "return_token_strs", False) else None)
        return _json({"count": len(ids), "max_model_len": self.model.max_model_len,
                      "tokens": ids, "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        self._check_model(body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ClientError("tokens must be a list of token ids", "tokens")
        return _json({"prompt": self.model.decode(tokens)})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        return _json({"success": self.engine.reset_prefix_cache()})

    async def metrics(self, request: web.Request) -> web.Response:
        """The whole page; ``name[]`` is ignored here, as on vLLM's ``/metrics``."""
        if self.engine.metrics_delay_s > 0:  # the fault: an API server too busy to answer
            await asyncio.sleep(self.engine.metrics_delay_s)
        return web.Response(body=metrics.render(self.engine).encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def metrics_restricted(self, request: web.Request) -> web.Response:
        """``/metrics/``: the page restricted to the ``name[]`` samples, when any are given."""
        if self.engine.metrics_delay_s > 0:
            await asyncio.sleep(self.engine.metrics_delay_s)
        names = frozenset(request.query.getall("name[]", []))
        page = (metrics.restrict(metrics.render(self.engine, names), names) if names
                else metrics.render(self.engine))
        return web.Response(body=page.encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

