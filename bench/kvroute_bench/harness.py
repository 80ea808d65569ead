"""The side-by-side run: one trace, the same engines, every contender in turn.

For each contender: reset every engine's prefix cache (``POST /reset_prefix_cache``, served
when the engines run with ``VLLM_SERVER_DEV_MODE=1``; it also emits ``AllBlocksCleared`` so
KV-event subscribers start empty), start the contender's router, send the warm-up requests
(the first ``warmup`` of the trace) and wait for them, scrape every engine's ``/metrics``,
send the rest of the trace open-loop, scrape again, stop the router. Only the second part is
reported, and engine counters are the difference of the two scrapes.

Router-added latency is estimated without instrumenting any router: the gap between the
client's mean TTFT and the engines' own mean TTFT (their histograms' sum/count deltas) is the
time spent outside the engine — client, HTTP, and for a router its proxying and queueing.
The same gap for ``direct-rr`` (no router) is subtracted from each router's gap.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvroute_bench import promtext
from kvroute_bench.client import run_trace
from kvroute_bench.contenders import Contender, FleetInfo
from kvroute_bench.stats import RequestResult, summarize
from kvroute_bench.workloads import Trace


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


def scrape(url: str) -> dict[promtext.Sample, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        return promtext.parse(resp.read().decode(errors="replace"))


@dataclass
class ContenderResult:
    """Everything reported for one contender."""

    name: str
    description: str
    requests: int
    errors: int
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    ttft_mean_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    output_tokens_per_s: float
    requests_per_s: float
    window_s: float
    prefix_hit_rate: float
    requests_per_engine: list[float]
    computed_tokens_per_engine: list[float]
    request_imbalance: float
    prefill_imbalance: float
    engine_ttft_mean_s: float
    outside_engine_ttft_s: float  # client mean TTFT minus the engines' mean TTFT
    router_added_s: float = math.nan  # outside_engine_ttft_s minus direct-rr's
    error_samples: list[str] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    skipped: str | None = None


def contender_result(contender: Contender, results: Sequence[RequestResult],
                     fleet: promtext.FleetDelta) -> ContenderResult:
    summary = summarize(results)
    return ContenderResult(
        name=contender.name, description=contender.description,
        **asdict(summary),
        prefix_hit_rate=fleet.prefix_hit_rate,
        requests_per_engine=fleet.requests_per_engine,
        computed_tokens_per_engine=fleet.computed_tokens_per_engine,
        request_imbalance=promtext.imbalance(fleet.requests_per_engine),
        prefill_imbalance=promtext.imbalance(fleet.computed_tokens_per_engine),
        engine_ttft_mean_s=fleet.engine_ttft_mean_s,
        outside_engine_ttft_s=summary.ttft_mean_s - fleet.engine_ttft_mean_s,
        error_samples=sorted({r.error for r in results if r.error})[:5],
        ttfts_s=sorted(r.ttft_s for r in results if r.ok))


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


Progress = Callable[[str, int, int], None]  # (phase, done, total)


def run_contender(plan: RunPlan, contender: Contender, fleet: FleetInfo,
                  progress: Progress) -> ContenderResult:
    """Reset caches, start the contender, warm up, measure, stop; the contender's result."""
    for engine in fleet.engines:
        reset_prefix_cache(engine.url)
    running = contender.start(fleet, plan.workdir / "routers", plan.bin_dirs)
    try:
        time.sleep(1.0)  # let KV-event subscribers connect before the first request
        warm = plan.trace.requests[: plan.warmup]
        measured = plan.trace.requests[plan.warmup:]
        done = [0]

        def tick(phase: str, total: int) -> Callable[[RequestResult], None]:
            def on_done(_: RequestResult) -> None:
                done[0] += 1
                progress(phase, done[0], total)
            return on_done

        if warm:
            asyncio.run(run_trace(running.base_urls, _model(fleet), warm,
                                  timeout_s=plan.request_timeout_s,
                                  on_done=tick("warm-up", len(warm))))
        before = [scrape(e.url) for e in fleet.engines]
        done[0] = 0
        results = asyncio.run(run_trace(running.base_urls, _model(fleet), measured,
                                        timeout_s=plan.request_timeout_s,
                                        on_done=tick("measured", len(measured))))
        time.sleep(1.0)  # engines update their counters just after the last stream ends
        after = [scrape(e.url) for e in fleet.engines]
    finally:
        running.stop()
    return contender_result(contender, results, promtext.engine_deltas(before, after))


def _model(fleet: FleetInfo) -> str:
    return fleet.model


def fill_router_added(results: list[ContenderResult]) -> None:
    """Subtract direct-rr's outside-engine TTFT from every contender's (when it ran)."""
    base = next((r for r in results if r.name == "direct-rr" and r.skipped is None), None)
    if base is None:
        return
    for r in results:
        if r.skipped is None:
            r.router_added_s = r.outside_engine_ttft_s - base.outside_engine_ttft_s


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
