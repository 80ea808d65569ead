"""The demo's workload and measurement: a seeded multi-tenant chat trace with long shared
system prompts, a closed-loop replay over HTTP with streaming TTFT, and engine-reported
prefix-cache hit rates from ``/metrics`` deltas.

Fairness: both contenders run on the same engines one after the other, so each gets its own
tenant prompt set (same count, length and structure; different text) — neither inherits the
other's cache. Requests, their order and concurrency are otherwise identical.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

WORDS = ("cache", "token", "kernel", "router", "tenant", "budget", "latency", "prefix", "block",
         "engine", "replica", "policy", "gateway", "stream", "batch", "queue", "memory", "pod",
         "cluster", "model", "request", "answer", "context", "window", "score", "pick")


@dataclass(frozen=True)
class ChatRequest:
    tenant: int
    messages: list[dict[str, str]]


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float
    e2e_s: float
    endpoint: str = ""
    error: str = ""


@dataclass
class ContenderResult:
    name: str
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    def ttft_quantile(self, q: float) -> float:
        values = sorted(r.ttft_s for r in self.ok)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q * len(values)))]

    @property
    def throughput(self) -> float:
        return len(self.ok) / self.wall_s if self.wall_s else 0.0

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "requests": len(self.results), "ok": len(self.ok),
                "ttft_p50_s": self.ttft_quantile(0.5), "ttft_p90_s": self.ttft_quantile(0.9),
                "e2e_mean_s": statistics.fmean(r.e2e_s for r in self.ok) if self.ok else None,
                "throughput_rps": self.throughput, "wall_s": self.wall_s,
                "prefix_cache_hit_rate": self.hit_rate,
                "prefix_cache_queries": self.prefix_queries,
                "prefix_cache_hits": self.prefix_hits}


def _text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    length = 0
    while length <= chars:  # joined length is length - 1: at least chars
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:chars]


def build_trace(seed: int, label: str, tenants: int, requests: int, prompt_chars: int,
                question_chars: int = 160) -> list[ChatRequest]:
    """``requests`` chat requests over ``tenants`` tenants in a seeded order. The order and
    question lengths depend only on ``seed``; the text also on ``label`` (one per contender)."""
    order_rng = random.Random(seed)
    text_rng = random.Random(f"{seed}/{label}")
    systems = [f"[{label} tenant {t}] You are the assistant of tenant {t}. "
               + _text(text_rng, prompt_chars) for t in range(tenants)]
    trace = []
    for i in range(requests):
        tenant = order_rng.randrange(tenants)
        question = f"Question {i}: " + _text(text_rng, question_chars)
        trace.append(ChatRequest(tenant, [{"role": "system", "content": systems[tenant]},
                                          {"role": "user", "content": question}]))
    return trace


async def send_chat(session: aiohttp.ClientSession, url: str, model: str, request: ChatRequest,
                    max_tokens: int, timeout_s: float) -> RequestResult:
    """One streamed chat completion; TTFT is the arrival of the first SSE event."""
    started = time.perf_counter()
    ttft = 0.0
    try:
        async with asyncio.timeout(timeout_s), session.post(url, json={
                "model": model, "messages": request.messages, "max_tokens": max_tokens,
                "stream": True, "ignore_eos": True, "temperature": 0}) as resp:
            endpoint = resp.headers.get("x-kvroute-endpoint", url)
            if resp.status != 200:
                body = (await resp.read())[:300].decode(errors="replace")
                return RequestResult(False, 0.0, time.perf_counter() - started, endpoint,
                                     f"HTTP {resp.status}: {body}")
            async for line in resp.content:
                if line.startswith(b"data:") and not ttft:
                    ttft = time.perf_counter() - started
            return RequestResult(ttft > 0, ttft, time.perf_counter() - started, endpoint)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return RequestResult(False, 0.0, time.perf_counter() - started, "", repr(exc))


async def replay(trace: Sequence[ChatRequest], pick_url: Callable[[int], str], model: str,
                 concurrency: int, max_tokens: int, timeout_s: float,
                 on_done: Callable[[RequestResult], None]) -> tuple[list[RequestResult], float]:
    """Closed-loop replay with ``concurrency`` workers; returns results in trace order and the
    wall time."""
    results: list[RequestResult | None] = [None] * len(trace)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(trace)):
        queue.put_nowait(i)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                result = await send_chat(session, pick_url(i), model, trace[i], max_tokens,
                                         timeout_s)
                results[i] = result
                on_done(result)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return [r for r in results if r is not None], wall


async def prefix_counters(session: aiohttp.ClientSession, engine_urls: Sequence[str]
                          ) -> tuple[float, float]:
    """Sum of (vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total) over engines."""
    from kvroute_router.scrape.vllm_metrics import parse_vllm_metrics

    queries = hits = 0.0
    for url in engine_urls:
        async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            metrics = parse_vllm_metrics(await r.text(), 0.0)
        queries += metrics.prefix_cache_queries
        hits += metrics.prefix_cache_hits
    return queries, hits
