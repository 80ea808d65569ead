"""The side-by-side run: one trace, the same engines, every contender in turn.

For each contender: reset every engine's prefix cache (``POST /reset_prefix_cache``, served
when the engines run with ``VLLM_SERVER_DEV_MODE=1``; it also emits ``AllBlocksCleared`` so
KV-event subscribers start empty), start the contender's router, send the warm-up requests
(the first ``warmup`` of the trace) and wait for them, scrape every engine's ``/metrics``,
send the rest of the trace open-loop, scrape again, stop the router. Only the second part is
reported, and engine counters are the difference of the two scrapes.

With ``continuous_warmup`` the warm-up does not drain: the whole trace is one open-loop stream
and the first scrape is taken (in a worker thread) as the first measured request is sent, so
the measured window starts with the queues and caches the warm-up left — a steady state, not
a warm cache behind an idle fleet. The warm-up requests still in flight then finish inside the
window: their engine counters land in it, their latencies do not.

Router-added latency is measured without instrumenting any router, after the measured window:
``OVERHEAD_PAIRS`` pairs of tiny requests (a fresh 48-token prompt, one output token), sent one
at a time, alternately through the router and straight to an engine; the median router time
minus the median direct time is what the router adds to an unloaded request. The gap between
the client's mean TTFT and the engines' own mean TTFT (their histograms' sum/count deltas) is
kept too (``outside_engine_ttft_s``): under load it also holds queueing in the router and the
engines' HTTP front ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from kvroute_bench import promtext
from kvroute_bench.client import run_trace, send_one
from kvroute_bench.contenders import Contender, FleetInfo, start_replicas
from kvroute_bench.stats import LatencySummary, RequestResult, summarize_rounds
from kvroute_bench.workloads import Trace, TraceRequest

OVERHEAD_PAIRS = 15


async def _overhead(router_url: str, engine_urls: Sequence[str], model: str, tag: str
                    ) -> float:
    """Median TTFT via the router minus median TTFT direct, over alternating tiny requests."""
    via: list[float] = []
    direct: list[float] = []
    async with aiohttp.ClientSession() as session:
        for i in range(OVERHEAD_PAIRS):
            for target, sink in ((router_url, via), (engine_urls[i % len(engine_urls)], direct)):
                prompt = f"{tag} overhead probe {i:03d} {target} "
                prompt = (prompt + "z" * 48)[:48]
                r = await send_one(session, target, model, TraceRequest(
                    index=i, arrival_s=0.0, prompt=prompt, max_tokens=1, group="probe",
                    shared_tokens=0), timeout_s=30.0)
                if r.ok:
                    sink.append(r.ttft_s)
    if not via or not direct:
        return math.nan
    return statistics.median(via) - statistics.median(direct)


class CacheResetError(RuntimeError):
    """An engine would not reset its prefix cache."""


def reset_prefix_cache(url: str, attempts: int = 30, pause_s: float = 1.0) -> None:
    """Empty one engine's prefix cache; retried while blocks are still held by requests."""
    last = ""
    for _ in range(attempts):
        request = urllib.request.Request(f"{url}/reset_prefix_cache", data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                body = resp.read()
                if resp.status == 200 and (not body or json.loads(body).get("success", True)):
                    return
                last = body.decode(errors="replace")[:200]
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise CacheResetError(
                    f"{url}/reset_prefix_cache answered 404: start the engines with "
                    "VLLM_SERVER_DEV_MODE=1 (kvroute bench does) or let the bench restart "
                    "them") from exc
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(pause_s)
    raise CacheResetError(f"{url} did not reset its prefix cache after {attempts} tries: {last}")


def scrape(url: str, timeout_s: float = 10.0) -> dict[promtext.Sample, float]:
    """The samples of ``url``'s ``/metrics`` (an engine, a kvroute router's proxy port);
    raises ``OSError`` when it does not answer in ``timeout_s``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout_s) as resp:
        return promtext.parse(resp.read().decode(errors="replace"))


def scrape_router_counters(contender: Contender, urls: Sequence[str]
                           ) -> dict[str, float] | None:
    """kvroute's counters summed over its replicas' ``/metrics`` (the proxy port serves them);
    empty for a peer, whose counters have other names; None when a replica does not answer
    (a router that died mid-run still gets its requests' errors reported, without counters)."""
    if contender.family != "kvroute":
        return {}
    counters: dict[str, float] = {}
    for url in urls:
        try:
            samples = scrape(url)
        except (OSError, ValueError):
            return None
        for key, value in promtext.router_counters(samples).items():
            counters[key] = counters.get(key, 0.0) + value
    return counters


@dataclass
class ContenderResult(LatencySummary):
    """Everything reported for one contender: its client-side latency summary (the inherited
    fields) plus what the engines and the router say."""

    name: str
    description: str
    prefix_hit_rate: float
    requests_per_engine: list[float]
    computed_tokens_per_engine: list[float]
    request_imbalance: float
    prefill_imbalance: float
    engine_ttft_mean_s: float
    outside_engine_ttft_s: float  # client mean TTFT minus the engines' mean TTFT
    router_added_s: float = math.nan  # median TTFT of tiny requests: via router - direct
    # CPU seconds the router process used over the measured window, per measured request: on
    # a machine whose engines share the cores with the router, this is taken from them.
    router_cpu_ms_per_request: float = math.nan
    error_samples: list[str] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    skipped: str | None = None
    rounds: int = 1
    # Each engine's own mean TTFT (its histogram's sum/count): tells a slow engine from a
    # bad routing decision.
    engine_ttft_mean_per_engine_s: list[float] = field(default_factory=list)
    # kvroute contenders: what the router's own counters added over the measured window,
    # summed over endpoints and replicas (promtext.router_counters); empty for peers.
    router_counters: dict[str, float] = field(default_factory=dict)
    # Running sequences the engines preempted over the window (vLLM's counter; the emulator
    # preempts only with --kv-allocation on-demand).
    engine_preemptions: float = 0.0


@dataclass
class Measurement:
    """One measured window of one contender."""

    results: list[RequestResult]
    fleet: promtext.FleetDelta
    router_added_s: float
    router_cpu_s: float = math.nan  # the router's CPU time over the measured window
    router_counters: dict[str, float] = field(default_factory=dict)


def aggregate(contender: Contender, rounds: Sequence[Measurement]) -> ContenderResult:
    """The contender's result over every round it ran (repeats pool their requests)."""
    result = contender_result(contender, [m.results for m in rounds],
                              promtext.combine([m.fleet for m in rounds]))
    added = [m.router_added_s for m in rounds if not math.isnan(m.router_added_s)]
    result.router_added_s = statistics.median(added) if added else math.nan
    cpu = [m.router_cpu_s for m in rounds]
    served = sum(len(m.results) for m in rounds)
    if served and not any(math.isnan(c) for c in cpu):
        result.router_cpu_ms_per_request = 1000.0 * sum(cpu) / served
    for m in rounds:
        for key, value in m.router_counters.items():
            result.router_counters[key] = result.router_counters.get(key, 0.0) + value
    result.rounds = len(rounds)
    return result


def contender_result(contender: Contender, rounds: Sequence[Sequence[RequestResult]],
                     fleet: promtext.FleetDelta) -> ContenderResult:
    summary = summarize_rounds(rounds)
    results = [r for round_ in rounds for r in round_]
    return ContenderResult(
        name=contender.name, description=contender.description,
        **asdict(summary),
        prefix_hit_rate=fleet.prefix_hit_rate,
        requests_per_engine=fleet.requests_per_engine,
        computed_tokens_per_engine=fleet.computed_tokens_per_engine,
        request_imbalance=promtext.imbalance(fleet.requests_per_engine),
        prefill_imbalance=promtext.imbalance(fleet.computed_tokens_per_engine),
        engine_ttft_mean_s=fleet.engine_ttft_mean_s, engine_preemptions=fleet.preemptions,
        outside_engine_ttft_s=summary.ttft_mean_s - fleet.engine_ttft_mean_s,
        error_samples=sorted({r.error for r in results if r.error})[:5],
        ttfts_s=sorted(r.ttft_s for r in results if r.ok),
        engine_ttft_mean_per_engine_s=[e.ttft_sum_s / e.ttft_count if e.ttft_count else math.nan
                                       for e in fleet.engines])


def skipped_result(contender: Contender, reason: str) -> ContenderResult:
    nan = math.nan
    return ContenderResult(
        name=contender.name, description=contender.description, requests=0, errors=0,
        ttft_p50_s=nan, ttft_p90_s=nan, ttft_p99_s=nan, ttft_mean_s=nan, e2e_p50_s=nan,
        e2e_p99_s=nan, output_tokens_per_s=nan, requests_per_s=nan, window_s=0.0,
        prefix_hit_rate=nan, requests_per_engine=[], computed_tokens_per_engine=[],
        request_imbalance=nan, prefill_imbalance=nan, engine_ttft_mean_s=nan,
        outside_engine_ttft_s=nan, skipped=reason)


@dataclass
class RunPlan:
    """What one side-by-side run does."""

    trace: Trace
    warmup: int
    contenders: list[Contender]
    workdir: Path
    bin_dirs: list[Path] = field(default_factory=list)
    request_timeout_s: float = 180.0
    # Emulated fleets run slower than real time by this factor: arrivals are stretched by it
    # and the client's measured times divided by it, so results are in emulated seconds.
    time_scale: float = 1.0
    # Independent copies of each router, requests spread over them round-robin per request.
    replicas: int = 1
    # The warm-up flows straight into the measured window instead of draining first.
    continuous_warmup: bool = False


T = TypeVar("T")


def dilate(requests: Sequence[TraceRequest], scale: float) -> list[TraceRequest]:
    """The trace with its arrival times stretched by ``scale``."""
    return [dataclasses.replace(r, arrival_s=r.arrival_s * scale) for r in requests]


def undilate(results: Sequence[RequestResult], scale: float) -> list[RequestResult]:
    """Results with every interval since the first send divided by ``scale``."""
    if scale == 1.0 or not results:
        return list(results)
    t0 = min(r.sent_s for r in results)

    def squeeze(t: float | None) -> float | None:
        return None if t is None else t0 + (t - t0) / scale

    return [dataclasses.replace(r, sent_s=t0 + (r.sent_s - t0) / scale,
                                first_token_s=squeeze(r.first_token_s),
                                done_s=squeeze(r.done_s)) for r in results]


Progress = Callable[[str, int, int], None]  # (phase, done, total)


async def send_continuous(base_urls: Sequence[str], model: str,
                          warm: Sequence[TraceRequest], measured: Sequence[TraceRequest],
                          at_switch: Callable[[], T], *, timeout_s: float,
                          on_done: Callable[[RequestResult], None] | None = None,
                          ) -> tuple[list[RequestResult], T]:
    """``warm`` then ``measured`` as one open-loop stream (``measured``'s arrival times follow
    on from ``warm``'s); ``at_switch()`` runs in a worker thread as the first measured request
    is sent (its blocking scrapes must not hold the sends back). Returns the measured requests'
    results and what ``at_switch`` returned."""
    loop = asyncio.get_running_loop()
    switched: list[asyncio.Future[T]] = []

    def on_sent(position: int) -> None:
        if position >= len(warm) and not switched:
            switched.append(loop.run_in_executor(None, at_switch))

    results = await run_trace(base_urls, model, [*warm, *measured], timeout_s=timeout_s,
                              on_done=on_done, on_sent=on_sent)
    if not switched:  # nothing measured: the switch is the end of the warm-up
        return [], at_switch()
    return results[len(warm):], await switched[0]


def run_contender(plan: RunPlan, contender: Contender, fleet: FleetInfo,
                  progress: Progress) -> Measurement:
    """Reset caches, start the contender, warm up, measure, probe its overhead, stop."""
    for engine in fleet.engines:
        reset_prefix_cache(engine.url)
    running = start_replicas(contender, fleet, plan.workdir / "routers", plan.bin_dirs,
                             plan.replicas)
    try:
        time.sleep(1.0)  # let KV-event subscribers connect before the first request
        scale = plan.time_scale
        warm = dilate(plan.trace.requests[: plan.warmup], scale)
        measured = dilate(plan.trace.requests[plan.warmup:], scale)
        done = [0]

        def tick(phase: str, total: int) -> Callable[[RequestResult], None]:
            def on_done(_: RequestResult) -> None:
                done[0] += 1
                progress(phase, done[0], total)
            return on_done

        def at_switch() -> tuple[list[dict[promtext.Sample, float]], float,
                                 dict[str, float] | None]:
            # The router's own scrape before its CPU reading: the window's CPU leaves it out.
            counters = scrape_router_counters(contender, running.base_urls)
            return [scrape(e.url) for e in fleet.engines], running.cpu_seconds(), counters

        if plan.continuous_warmup:
            sent, (before, cpu_before, counters_before) = asyncio.run(send_continuous(
                running.base_urls, _model(fleet), warm, measured, at_switch,
                timeout_s=plan.request_timeout_s * scale,
                on_done=tick("warm-up + measured", len(warm) + len(measured))))
        else:
            if warm:
                asyncio.run(run_trace(running.base_urls, _model(fleet), warm,
                                      timeout_s=plan.request_timeout_s * scale,
                                      on_done=tick("warm-up", len(warm))))
            before, cpu_before, counters_before = at_switch()
            done[0] = 0
            sent = asyncio.run(run_trace(running.base_urls, _model(fleet), measured,
                                         timeout_s=plan.request_timeout_s * scale,
                                         on_done=tick("measured", len(measured))))
        results = undilate(sent, scale)
        time.sleep(1.0)  # engines update their counters just after the last stream ends
        after = [scrape(e.url) for e in fleet.engines]
        router_cpu = running.cpu_seconds() - cpu_before
        counters_after = scrape_router_counters(contender, running.base_urls)
        counters = ({} if counters_before is None or counters_after is None
                    else promtext.counter_deltas(counters_before, counters_after))
        added = 0.0
        if contender.command is not None:
            progress("router overhead probe", 0, OVERHEAD_PAIRS)
            added = asyncio.run(_overhead(running.base_urls[0], [e.url for e in fleet.engines],
                                          fleet.model, contender.name))
    finally:
        running.stop()
    return Measurement(results, promtext.engine_deltas(before, after), added, router_cpu,
                       counters)


def _model(fleet: FleetInfo) -> str:
    return fleet.model


def to_json(results: Sequence[ContenderResult], meta: dict[str, Any]) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return None if math.isnan(value) else round(value, 6)
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value
    return clean({"meta": meta, "contenders": [asdict(r) for r in results]})  # type: ignore[no-any-return]
