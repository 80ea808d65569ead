"""The open-loop load generator: sends a trace's streaming requests at their arrival times.

Open loop means a request is sent at its scheduled time whether or not earlier ones have
finished, so a slow contender builds a queue instead of slowing the offered load (the mistake
a closed-loop client makes). Each request is an OpenAI ``/v1/completions`` call with
``stream: true``; TTFT is the time to the first streamed chunk that carries a token, e2e the time
to the end of the stream. ``ignore_eos`` makes the test model (random weights) produce exactly
``max_tokens`` tokens, so every contender does the same decoding work.

With several base URLs the client rotates over them itself, request by request: that is the
"direct round-robin" contender, with no router process in the path, and how requests are
spread over several replicas of one router (``--replicas``): like a Kubernetes Service with
per-request (L7) balancing, e.g. Envoy or a gateway, in front of the router Deployment. (Plain
kube-proxy balances per connection; with keep-alive clients that pins a client to a replica.)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence

import aiohttp

from kvroute_bench.stats import RequestResult
from kvroute_bench.workloads import TraceRequest


def request_path(request: TraceRequest) -> str:
    return "/v1/chat/completions" if request.messages is not None else "/v1/completions"


def request_body(model: str, request: TraceRequest) -> dict[str, object]:
    """The completions (or, for a chat request, chat completions) body sent for ``request``."""
    text: dict[str, object] = (
        {"messages": [{"role": role, "content": content}
                      for role, content in request.messages]}
        if request.messages is not None else {"prompt": request.prompt})
    return {
        "model": model,
        **text,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }


async def send_one(session: aiohttp.ClientSession, url: str, model: str, request: TraceRequest,
               timeout_s: float, headers: dict[str, str] | None = None) -> RequestResult:
    result = RequestResult(index=request.index, sent_s=time.monotonic(),
                           prompt_tokens=request.prompt_tokens)
    token_chunks = 0
    usage_tokens: int | None = None
    try:
        async with session.post(f"{url}{request_path(request)}",
                                json=request_body(model, request), headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                body = (await resp.text())[:200]
                result.error = f"HTTP {resp.status}: {body}"
                return result
            buffer = b""
            async for data in resp.content.iter_any():
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        continue
                    event = json.loads(payload)
                    if event.get("error"):
                        result.error = f"stream error: {str(event['error'])[:200]}"
                        return result
                    choices = event.get("choices") or []
                    if choices and "role" in (choices[0].get("delta") or {}):
                        continue  # a chat stream's opening chunk carries the role, no token
                    if choices:  # a token, even one whose text is a partial UTF-8 byte
                        if result.first_token_s is None:
                            result.first_token_s = time.monotonic()
                        token_chunks += 1
                    usage = event.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
            result.done_s = time.monotonic()
            result.output_tokens = usage_tokens if usage_tokens is not None else token_chunks
            if result.first_token_s is None:
                result.error = "stream ended without any token"
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    return result


async def run_trace(base_urls: Sequence[str], model: str, requests: Sequence[TraceRequest],
                    *, timeout_s: float = 180.0, max_connections: int = 512,
                    on_done: Callable[[RequestResult], None] | None = None,
                    on_sent: Callable[[int], None] | None = None,
                    ) -> list[RequestResult]:
    """Send ``requests`` open-loop (at their ``arrival_s`` relative to now); return results.

    Request *i* goes to ``base_urls[i % len(base_urls)]``. Every request ends within
    ``timeout_s`` of being sent, so the whole run is bounded by the last arrival plus it.
    ``on_sent(i)`` is called as request *i* is sent, ``on_done(result)`` as it ends.
    """
    if not base_urls:
        raise ValueError("at least one base URL is needed")
    if not requests:
        return []
    offset = requests[0].arrival_s
    connector = aiohttp.TCPConnector(limit=max_connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.monotonic()

        async def scheduled(position: int, request: TraceRequest) -> RequestResult:
            delay = start + (request.arrival_s - offset) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            url = base_urls[position % len(base_urls)]
            if on_sent is not None:
                on_sent(position)
            result = await send_one(session, url, model, request, timeout_s)
            if on_done is not None:
                on_done(result)
            return result

        tasks = [asyncio.create_task(scheduled(i, r)) for i, r in enumerate(requests)]
        return list(await asyncio.gather(*tasks))
