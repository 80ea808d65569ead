"""The router process's CPU per request, and one process's request-rate ceiling (issue 17).

Both parts start the project's engine emulator (``python -m kvroute_emulator``, the engines of
``kvroute engines --emulate``) and one ``kvroute router`` process on the proxy path with the
precise prefix scorer (``kvroute-precise`` of ``kvroute bench``: an External pool, KV events
from every engine, only the HTTP proxy listening, the default adaptive ``/metrics`` scrape), then
send streaming ``/v1/completions`` requests whose prompts are long tenant contexts plus a fresh
question (``precise_prefix_trace`` of ``kvroute bench``).

1. ``cpu``: router CPU seconds (user + system of its process group, from /proc) over an idle
   window with no traffic (what scraping and the KV-event subscribers cost per second), then
   over ``--requests`` requests sent open-loop at ``--rate``. Reported: gross CPU per request
   (all CPU in the window / requests), and net (minus the idle rate times the window), plus
   the idle cost per engine scrape (idle CPU over the scrapes the router counted in the
   window, ``kvroute_scrapes_total``). The router scrapes an idle engine less often than a
   busy one (docs/router.md, *Scraper*), so since round 18 the idle rate leaves out the busy
   engines' extra scrapes and net carries them;
   ``--router-arg=--accounted-scrape-interval-ms=100 --router-arg=--idle-scrape-interval-ms=100``
   measures as rounds before 18 did. CPU time is far less sensitive than latency to the other
   work on a shared machine, but not immune: on a VM the same instructions take more CPU time
   while neighbours contend for the host's caches, so every run also records a *machine
   probe* (CPU ms of a fixed piece of work in the driver, just before and just after the
   measured window) and the vCPU time the hypervisor stole during it; compare runs whose
   probes agree. ``--py-spy FILE`` records a raw py-spy profile of the router over
   the measured window. ``--contender NAME`` measures another contender of ``kvroute bench``
   that runs a router process instead: a peer (from the bench venv), ``kvroute-queue``
   (kvroute without prefix scoring) or ``envoy-rr`` (Envoy round-robin, no decision: the
   floor a C++ proxy's hop sets on the same machine).
2. ``ceiling``: 64 engines whose compute costs (almost) nothing (a profile with 1 µs per
   prompt token and 0.5 ms steps), ~8k-token prompts, 2 output tokens. The rate steps up; at
   each step requests go through the router at the step's rate and, interleaved with them, a
   quarter as many go straight to an engine (rotating). Every request carries an
   ``x-request-id``; the emulator records when each reached its handler and when its first
   token was written (``GET /timings`` on its admin port, ``time.monotonic()``, which all
   processes share). A request's *outside-engine* time is its client TTFT minus that engine
   interval: the client, the hops, and for routed requests the router. The *added* latency
   is the routed requests' outside-engine quantile minus the direct ones' (p50 and p99), and
   the ceiling is the highest step whose added p99 stays within ``--added-limit-ms``. A step
   sends at least ``--min-requests`` routed requests (default 200), lasting longer than
   ``--seconds`` at low rates: a p99 of the 30 requests of a 15-second step at 2 req/s is
   their slowest one, so the rule read the lowest step's single worst request. For
   kvroute each step also reads the router's own histograms before and after (its decision
   time, event-loop lag, garbage-collector passes, prefill waits: ``report``'s breakdown
   table), to tell what its tail is made of. ``--router-arg`` passes kvroute's router one
   more flag (``--router-arg=--scrape-interval-ms=1000``).

Run (the published figures: docs/benchmarks/router-cpu.md)::

    python bench/router_cpu.py cpu --engines 16 --requests 300 --warmup 30 --rate 20 \
        --idle-seconds 6 --output-tokens 64 --json cpu.json
    python bench/router_cpu.py ceiling --engines 64 --rates 2,5,10,20,30,45,60 \
        --seconds 15 --json ceiling.json
    python bench/router_cpu.py report --cpu LABEL=cpu.json ... --ceiling ceiling.json \
        --plot docs/benchmarks/router-cpu.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from kvroute_bench import promtext
from kvroute_bench.cli import EmulatedFleetProcess, bench_bin_dirs
from kvroute_bench.client import send_one
from kvroute_bench.contenders import (
    CONTENDERS,
    Contender,
    EngineInfo,
    FleetInfo,
    RunningContender,
    process_group_cpu_seconds,
)
from kvroute_bench.harness import scrape
from kvroute_bench.stats import RequestResult, percentile
from kvroute_bench.workloads import (
    LogNormal,
    PrecisePrefixParams,
    TraceRequest,
    precise_prefix_trace,
)
from kvroute_router.scrape.scraper import scrape_periods

# Engines that answer at once: the ceiling measures the router, not the emulated GPUs.
FAST_PROFILE = {"prefill_s_per_token": 1e-6, "step_base_s": 0.0005,
                "decode_step_s_by_batch": {"1": 0.0005, "256": 0.001},
                "max_num_seqs": 256, "max_batched_tokens": 65536, "block_size": 16,
                "kv_blocks": 30000}
DIRECT_SHARE = 0.25  # direct requests per routed request in a ceiling step


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return math.nan


def steal_seconds() -> float:
    """CPU time the hypervisor gave other guests while this one's vCPUs wanted to run, summed
    over the vCPUs since boot (``/proc/stat``); NaN where the kernel does not say."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


def probe_work(rounds: int = 40) -> int:
    """A fixed piece of the work a Python router does — SHA-256 over fresh buffers (C), a dict
    of small ints built and probed (the interpreter, the allocator, the caches), a sort — and a
    checksum so nothing is optimised away."""
    checksum = 0
    rng = random.Random(7)
    for _ in range(rounds):
        buf = rng.randbytes(64 * 1024)
        checksum ^= int.from_bytes(hashlib.sha256(buf).digest()[:4], "big")
        table = {i * 2654435761 % 1_000_003: i for i in range(4000)}
        checksum ^= sum(table.get(i, 0) for i in range(0, 1_000_003, 250))
        checksum ^= sorted(buf[:4096])[2048]
    return checksum


def machine_probe_ms(repeats: int = 5) -> float:
    """CPU ms :func:`probe_work` takes in this process now (the median of ``repeats``).

    On a shared VM the same instructions cost more CPU time when neighbours contend for the
    host's caches and memory bandwidth; CPU time per request is only comparable between runs
    whose probes agree. Taken before and after a run's measured window, never during it."""
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.process_time()
        probe_work()
        times.append(1000.0 * (time.process_time() - t0))
    return sorted(times)[len(times) // 2]


@dataclass
class Fleet:
    """The emulator and the router in front of it."""

    emulated: EmulatedFleetProcess
    info: FleetInfo
    router: RunningContender

    def stop(self) -> None:
        self.router.stop()
        self.emulated.stop()

    def router_cpu(self) -> float:
        return self.router.cpu_seconds()

    def emulator_cpu(self) -> float:
        return process_group_cpu_seconds(self.emulated.process.pid)


FLOOR_PROXY = Contender(
    "python-floor", "baseline", "a do-nothing Python proxy on uvloop (bench/floor_proxy.py)",
    lambda fleet, port, workdir: [sys.executable, str(Path(__file__).with_name("floor_proxy.py")),
                                  str(port), *(e.address for e in fleet.engines)])
"""Measured here only (``--contender python-floor``), never by ``kvroute bench``: the CPU any
Python proxy on uvloop pays per request and per token, beside which kvroute's own work shows
(round 22)."""


def measured_contender(name: str) -> Contender:
    """``name``'s contender: one of ``kvroute bench``'s, or :data:`FLOOR_PROXY`."""
    return FLOOR_PROXY if name == FLOOR_PROXY.name else CONTENDERS.select([name])[0]


def start_fleet(engines: int, profile: str, workdir: Path, max_context: int,
                event_loop: str = "uvloop", contender_name: str = "kvroute-precise",
                bin_dirs: Sequence[Path] = (), router_args: Sequence[str] = ()) -> Fleet:
    """The emulated engines and ``contender_name``'s router in front of them (kvroute: on
    ``event_loop``, with ``router_args`` after its own flags, so they win; a peer or
    ``envoy-rr``: from ``bin_dirs`` or PATH, as its users run it)."""
    args = argparse.Namespace(engines=engines, profile=profile, time_scale=1.0,
                              kv_blocks_set=False, kv_blocks=0, block_size_set=False,
                              block_size=0, max_context=max_context,
                              scheduling_policy="fcfs", kv_allocation="reserve")
    emulated = EmulatedFleetProcess(args, workdir)
    entries = json.loads(emulated.info_path.read_text())
    info = FleetInfo([EngineInfo(name=e["name"], url=e["url"],
                                 kv_events_endpoint=e["kv_events_endpoint"],
                                 replay_endpoint=e["replay_endpoint"]) for e in entries],
                     emulated.info["model"], int(emulated.info["block_size"]),
                     emulated.model_dir, 1.0)
    contender = measured_contender(contender_name)
    command = contender.command
    if command is None:
        emulated.stop()
        raise SystemExit(f"{contender_name} starts no router process: nothing to measure")
    if contender.family == "kvroute":
        contender = replace(contender, command=lambda fleet, port, folder: [
            *command(fleet, port, folder), "--event-loop", event_loop, *router_args])
    elif router_args:
        emulated.stop()
        raise SystemExit(f"--router-arg is for kvroute's router, not {contender_name}")
    try:
        router = contender.start(info, workdir / "router", bin_dirs)
    except BaseException:
        emulated.stop()
        raise
    time.sleep(1.0)  # let the KV-event subscribers connect
    return Fleet(emulated, info, router)


def peer_bin_dirs(args: argparse.Namespace) -> list[Path]:
    """Where a peer router's executable is (the bench venv); nothing for kvroute and Envoy,
    which the dev venv has (so measuring them never builds the bench venv)."""
    family = measured_contender(args.contender).family
    return [] if family in ("kvroute", "baseline") else bench_bin_dirs(args.bench_venv)


def trace(count: int, rate: float, seed: int, tenants: int, context: int, output: int,
          max_context: int) -> list[TraceRequest]:
    params = PrecisePrefixParams(requests=count, rate=rate, seed=seed, tenants=tenants,
                                 context_tokens=context, max_context=max_context,
                                 output=LogNormal(output, 0.0, output, output))
    return precise_prefix_trace(params)


async def drive(targets: Sequence[tuple[str, TraceRequest]], model: str, timeout_s: float,
                tag: str = "") -> list[RequestResult]:
    """Send each (base URL, request) at its arrival time, open loop; with ``tag``, request
    *i* carries ``x-request-id: {tag}-{i}`` (its index), which the emulator's timings use."""
    if not targets:
        return []
    connector = aiohttp.TCPConnector(limit=1024)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.monotonic()
        offset = targets[0][1].arrival_s

        async def one(url: str, request: TraceRequest) -> RequestResult:
            delay = start + request.arrival_s - offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            headers = {"x-request-id": f"{tag}-{request.index}"} if tag else None
            return await send_one(session, url, model, request, timeout_s, headers)

        return list(await asyncio.gather(*(one(u, r) for u, r in targets)))


# --- part 1: CPU per request ------------------------------------------------------------------

def scrapes_between(before: dict[promtext.Sample, float],
                    after: dict[promtext.Sample, float]) -> float:
    """Engine scrapes kvroute's router made between two reads of its /metrics
    (``kvroute_scrapes_total``, every pool); 0 for a router without it."""
    return sum(v - before.get(k, 0.0) for k, v in after.items()
               if k[0] == "kvroute_scrapes_total")


def idle_scrape_period_ms(router_args: Sequence[str]) -> float:
    """How often kvroute's router scrapes an idle engine, from the flags ``cpu`` passes it
    (``--router-arg``, the last one of a name winning as in argparse): its
    ``--idle-scrape-interval-ms``, by default the router's (:func:`scrape_periods`). The
    per-scrape idle cost divides by this only where the router does not count its scrapes
    (``kvroute_scrapes_total``, since 2026-12-07): the idle window begins 2 s after the
    engines are up, inside the first ten pages, which come at the accounted period."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--scrape-interval-ms", type=float, default=100.0)
    parser.add_argument("--accounted-scrape-interval-ms", type=float, default=None)
    parser.add_argument("--idle-scrape-interval-ms", type=float, default=None)
    known, _ = parser.parse_known_args(list(router_args))
    given = [None if ms is None else ms / 1000.0
             for ms in (known.accounted_scrape_interval_ms, known.idle_scrape_interval_ms)]
    return 1000.0 * scrape_periods(known.scrape_interval_ms / 1000.0, *given)[2]


@dataclass
class CpuResult:
    engines: int
    requests: int
    errors: int
    rate: float
    output_tokens: int
    prompt_tokens_mean: float
    idle_window_s: float
    idle_cpu_s_per_s: float
    idle_cpu_ms_per_scrape: float
    window_s: float
    router_cpu_s: float
    gross_cpu_ms_per_request: float
    net_cpu_ms_per_request: float
    emulator_cpu_ms_per_request: float
    loadavg_before: float
    loadavg_after: float
    error_samples: list[str]
    probe_ms_before: float = math.nan
    """:func:`machine_probe_ms` just before the measured window (and after it, below)."""
    probe_ms_after: float = math.nan
    steal_s: float = math.nan
    """vCPU time stolen by the hypervisor during the measured window (both vCPUs)."""
    idle_scrapes: float = math.nan
    """Engine scrapes the router counted in the idle window (``kvroute_scrapes_total``);
    0 for a router that does not count them (a peer, Envoy): the per-scrape cost then
    assumes the idle period (:func:`idle_scrape_period_ms`)."""
    window_scrapes: float = math.nan
    """Engine scrapes the router counted in the measured window (``kvroute_scrapes_total``;
    0 for a router that does not count them): the scraping part of its CPU, counted."""


def measure_cpu(args: argparse.Namespace) -> CpuResult:
    with tempfile.TemporaryDirectory(prefix="router-cpu-") as tmp:
        fleet = start_fleet(args.engines, args.profile, Path(tmp), args.max_context,
                            args.event_loop, args.contender,
                            peer_bin_dirs(args), args.router_arg)
        try:
            requests = trace(args.warmup + args.requests, args.rate, args.seed, args.tenants,
                             args.context, args.output_tokens, args.max_context)
            url = fleet.router.base_urls[0]
            # Idle: scraping and KV-event subscribers only.
            time.sleep(2.0)
            load_before = loadavg()
            pages_before = router_samples(fleet)
            idle_t0, idle_c0 = time.monotonic(), fleet.router_cpu()
            time.sleep(args.idle_seconds)
            idle_s = time.monotonic() - idle_t0
            idle_rate = (fleet.router_cpu() - idle_c0) / idle_s
            idle_scrapes = scrapes_between(pages_before, router_samples(fleet))
            warm = requests[: args.warmup]
            asyncio.run(drive([(url, r) for r in warm], fleet.info.model, 120.0))
            measured = requests[args.warmup:]
            spy: subprocess.Popen[bytes] | None = None
            if args.py_spy:
                assert fleet.router.process is not None
                spy = subprocess.Popen(["py-spy", "record", "-r", "100", "-f", "raw", "-o",
                                        args.py_spy, "-p", str(fleet.router.process.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            probe_before = machine_probe_ms()
            pages_before = router_samples(fleet)
            t0, c0, e0 = time.monotonic(), fleet.router_cpu(), fleet.emulator_cpu()
            s0 = steal_seconds()
            results = asyncio.run(drive([(url, r) for r in measured], fleet.info.model, 120.0))
            window = time.monotonic() - t0
            cpu = fleet.router_cpu() - c0
            window_scrapes = scrapes_between(pages_before, router_samples(fleet))
            emu = fleet.emulator_cpu() - e0
            steal = steal_seconds() - s0
            probe_after = machine_probe_ms()
            if spy is not None:
                spy.send_signal(2)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(timeout=30)
            load_after = loadavg()
            if any(not r.ok for r in results) and fleet.router.log_path is not None:
                print(fleet.router.log_path.read_text(errors="replace")[-3000:],
                      file=sys.stderr)
        finally:
            fleet.stop()
    n = len(measured)
    scrapes_per_s = (idle_scrapes / idle_s if idle_scrapes
                     else args.engines * 1000.0 / idle_scrape_period_ms(args.router_arg))
    return CpuResult(
        engines=args.engines, requests=n, errors=sum(1 for r in results if not r.ok),
        rate=args.rate, output_tokens=args.output_tokens,
        prompt_tokens_mean=sum(r.prompt_tokens for r in measured) / max(1, n),
        idle_window_s=idle_s, idle_cpu_s_per_s=idle_rate,
        idle_cpu_ms_per_scrape=1000.0 * idle_rate / scrapes_per_s,
        window_s=window, router_cpu_s=cpu,
        gross_cpu_ms_per_request=1000.0 * cpu / n,
        net_cpu_ms_per_request=1000.0 * (cpu - idle_rate * window) / n,
        emulator_cpu_ms_per_request=1000.0 * emu / n,
        loadavg_before=load_before, loadavg_after=load_after,
        error_samples=sorted({r.error for r in results if r.error})[:3],
        probe_ms_before=probe_before, probe_ms_after=probe_after, steal_s=steal,
        idle_scrapes=idle_scrapes, window_scrapes=window_scrapes)


# --- part 2: the ceiling ----------------------------------------------------------------------

@dataclass
class CeilingStep:
    rate: float
    routed: int
    direct: int
    errors: int
    unmatched: int  # answered requests the emulator has no timing for
    achieved_rate: float
    via_ttft_p50_ms: float
    via_ttft_p99_ms: float
    direct_ttft_p50_ms: float
    # Outside the engine: client TTFT minus (first token written - arrival) at the engine.
    via_outside_p50_ms: float
    via_outside_p99_ms: float
    direct_outside_p50_ms: float
    direct_outside_p99_ms: float
    added_p50_ms: float  # via_outside_p50 - direct_outside_p50
    added_p99_ms: float  # via_outside_p99 - direct_outside_p99
    router_cpu_cores: float
    router_cpu_ms_per_request: float
    emulator_cpu_cores: float
    loadavg: float
    # Up to three distinct failures, each "routed: ..." or "direct: ..." (what the client saw).
    error_samples: list[str] = field(default_factory=list)
    # The router's own view of the step, from its /metrics before and after (kvroute only:
    # NaN / 0 for other contenders). Times are bucket upper bounds (upper estimates).
    decision_p50_ms: float = math.nan
    decision_p99_ms: float = math.nan
    loop_lag_samples: int = 0  # one every --loop-lag-probe-ms (50 ms)
    loop_lag_p99_ms: float = math.nan
    loop_lag_over_5ms: int = 0  # samples that found the loop busy for 5 ms or more
    gc_passes: dict[str, int] = field(default_factory=dict)  # by generation
    gc_over_5ms: int = 0  # passes of 5 ms or more
    prefill_waits: int = 0  # requests held for a prefix another request was computing


def _ms(values: Sequence[float], q: float) -> float:
    return 1000.0 * percentile(values, q)


def router_samples(fleet: Fleet) -> dict[promtext.Sample, float]:
    """The router's /metrics on its proxy port; empty when it has none (a peer, Envoy)."""
    try:
        return scrape(fleet.router.base_urls[0], timeout_s=30.0)
    except (OSError, ValueError):
        return {}


def router_view(before: dict[promtext.Sample, float], after: dict[promtext.Sample, float]
                ) -> dict[str, Any]:
    """The CeilingStep fields read off the router's own histograms over a step."""
    def hist(name: str, **labels: str) -> list[tuple[float, float]]:
        return promtext.histogram_delta(before, after, name, **labels)

    decision = hist("kvroute_decision_latency_seconds")
    lag = hist("kvroute_event_loop_lag_seconds")
    gc_passes = {g: hist("kvroute_gc_pause_seconds", generation=g) for g in ("0", "1", "2")}
    waits = sum(v - before.get(k, 0.0) for k, v in after.items()
                if k[0] == "kvroute_prefill_waits_total")
    return {
        "decision_p50_ms": 1000 * promtext.bucket_quantile(decision, 50),
        "decision_p99_ms": 1000 * promtext.bucket_quantile(decision, 99),
        "loop_lag_samples": round(sum(n for _, n in lag)),
        "loop_lag_p99_ms": 1000 * promtext.bucket_quantile(lag, 99),
        "loop_lag_over_5ms": round(promtext.count_above(lag, 0.005)),
        "gc_passes": {g: round(sum(n for _, n in b)) for g, b in gc_passes.items()},
        "gc_over_5ms": round(sum(promtext.count_above(b, 0.005) for b in gc_passes.values())),
        "prefill_waits": round(waits),
    }


def take_timings(fleet: Fleet) -> dict[str, tuple[float, float]]:
    """The emulator's (arrival, first token written) per x-request-id since the last call."""
    with urllib.request.urlopen(f"{fleet.emulated.info['admin_url']}/timings",
                                timeout=30) as resp:
        data: dict[str, list[float]] = json.loads(resp.read())
    return {k: (v[0], v[1]) for k, v in data.items()}


def step_requests(rate: float, seconds: float, min_requests: int) -> int:
    """Routed requests in a ceiling step: ``seconds`` at ``rate``, but at least
    ``min_requests``, so that the step's p99 is not its single slowest request."""
    return max(min_requests, round(rate * seconds))


def ceiling_step(fleet: Fleet, rate: float, seconds: float, args: argparse.Namespace,
                 seed: int) -> CeilingStep:
    count = step_requests(rate, seconds, args.min_requests)
    routed = trace(count, rate, seed, args.tenants, args.context, args.output_tokens,
                   args.max_context)
    rng = random.Random(seed)
    direct_count = max(4, round(count * DIRECT_SHARE))
    engines = [e.url for e in fleet.info.engines]
    direct_at = sorted(rng.uniform(0.0, routed[-1].arrival_s) for _ in range(direct_count))
    extra = trace(direct_count, rate, seed + 10_000, args.tenants, args.context,
                  args.output_tokens, args.max_context)
    url = fleet.router.base_urls[0]
    targets = [(url, r) for r in routed]
    targets += [(engines[i % len(engines)], replace(r, index=-1 - i, arrival_s=at))
                for i, (r, at) in enumerate(zip(extra, direct_at, strict=True))]
    targets.sort(key=lambda t: t[1].arrival_s)
    take_timings(fleet)  # forget anything earlier
    seen = router_samples(fleet)
    t0, c0, e0 = time.monotonic(), fleet.router_cpu(), fleet.emulator_cpu()
    results = asyncio.run(drive(targets, fleet.info.model, 60.0, tag=f"s{seed}"))
    window = time.monotonic() - t0
    cpu, emu = fleet.router_cpu() - c0, fleet.emulator_cpu() - e0
    view = router_view(seen, router_samples(fleet)) if seen else {}
    timings = take_timings(fleet)
    via: list[float] = []
    direct: list[float] = []
    outside: dict[bool, list[float]] = {True: [], False: []}
    unmatched = 0
    for r in results:
        if not r.ok:
            continue
        (via if r.index >= 0 else direct).append(r.ttft_s)
        engine = timings.get(f"s{seed}-{r.index}")
        if engine is None:
            unmatched += 1
            continue
        outside[r.index >= 0].append(r.ttft_s - (engine[1] - engine[0]))
    sent = [r.sent_s for r in results if r.index >= 0]
    out_via, out_direct = outside[True], outside[False]
    return CeilingStep(
        rate=rate, routed=len(routed), direct=direct_count,
        errors=sum(1 for r in results if not r.ok), unmatched=unmatched,
        achieved_rate=len(sent) / max(1e-9, max(sent) - min(sent)) if len(sent) > 1 else 0.0,
        via_ttft_p50_ms=_ms(via, 50), via_ttft_p99_ms=_ms(via, 99),
        direct_ttft_p50_ms=_ms(direct, 50),
        via_outside_p50_ms=_ms(out_via, 50), via_outside_p99_ms=_ms(out_via, 99),
        direct_outside_p50_ms=_ms(out_direct, 50), direct_outside_p99_ms=_ms(out_direct, 99),
        added_p50_ms=_ms(out_via, 50) - _ms(out_direct, 50),
        added_p99_ms=_ms(out_via, 99) - _ms(out_direct, 99),
        router_cpu_cores=cpu / window, router_cpu_ms_per_request=1000.0 * cpu / len(routed),
        emulator_cpu_cores=emu / window, loadavg=loadavg(),
        error_samples=sorted({f"{'routed' if r.index >= 0 else 'direct'}: {r.error}"
                              for r in results if not r.ok})[:3], **view)


def measure_ceiling(args: argparse.Namespace) -> list[CeilingStep]:
    steps: list[CeilingStep] = []
    with tempfile.TemporaryDirectory(prefix="router-ceiling-") as tmp:
        profile = Path(tmp) / "fast.json"
        profile.write_text(json.dumps(FAST_PROFILE))
        fleet = start_fleet(args.engines, str(profile), Path(tmp), args.max_context,
                            args.event_loop, args.contender,
                            peer_bin_dirs(args), args.router_arg)
        try:
            # Warm-up: every tenant's context cached somewhere, connections open.
            warm = trace(args.warmup, 10.0, args.seed + 99, args.tenants, args.context,
                         args.output_tokens, args.max_context)
            asyncio.run(drive([(fleet.router.base_urls[0], r) for r in warm],
                              fleet.info.model, 60.0))
            for i, rate in enumerate(args.rates):
                step = ceiling_step(fleet, rate, args.seconds, args, args.seed + i)
                steps.append(step)
                print(json.dumps(asdict(step)), flush=True)
                if step.errors or step.via_ttft_p50_ms > 1000.0 * args.overload_s:
                    break  # overloaded: higher rates only queue
        finally:
            fleet.stop()
    return steps


def ceiling_of(steps: Sequence[CeilingStep], limit_ms: float) -> float:
    """The highest rate whose added p99 stayed within ``limit_ms`` (steps below it too)."""
    best = 0.0
    for step in steps:
        if step.errors or math.isnan(step.added_p99_ms) or step.added_p99_ms > limit_ms:
            break
        best = step.rate
    return best


def cpu_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown rows of ``cpu`` results (label, the JSON's ``result``)."""
    lines = ["| run | engines | output tokens | requests (errors) | rate /s | idle CPU (cores) "
             "| per scrape (ms) | gross ms/request | net ms/request | emulator ms/request "
             "| load avg | machine probe ms (before, after; steal s) |", "|" + "---|" * 12]
    for label, r in rows:
        probe = "—"  # runs recorded before the probe existed
        if not math.isnan(r.get("probe_ms_before", math.nan)):
            probe = (f"{r['probe_ms_before']:.1f}, {r['probe_ms_after']:.1f}; "
                     f"{r.get('steal_s', math.nan):.2f}")
        lines.append(
            f"| {label} | {r['engines']} | {r['output_tokens']} | {r['requests']} "
            f"({r['errors']}) | {r['rate']:g} | {r['idle_cpu_s_per_s']:.3f} "
            f"| {r['idle_cpu_ms_per_scrape']:.2f} | {r['gross_cpu_ms_per_request']:.1f} "
            f"| {r['net_cpu_ms_per_request']:.1f} | {r['emulator_cpu_ms_per_request']:.1f} "
            f"| {r['loadavg_before']:.1f} to {r['loadavg_after']:.1f} | {probe} |")
    return "\n".join(lines)


def ceiling_table(steps: Sequence[dict[str, Any]]) -> str:
    """Markdown rows of ``ceiling`` steps."""
    lines = ["| rate /s (sent) | routed / direct (errors) | TTFT p50 / p99 via router (ms) "
             "| TTFT p50 direct (ms) | outside engine p50 / p99 via (ms) "
             "| outside engine p50 / p99 direct (ms) | added p50 / p99 (ms) "
             "| router CPU (cores; ms/request) | emulator CPU (cores) | load avg |",
             "|" + "---|" * 10]
    for s in steps:
        lines.append(
            f"| {s['rate']:g} ({s['achieved_rate']:.1f}) | {s['routed']} / {s['direct']} "
            f"({s['errors']}; {s['unmatched']} unmatched) "
            f"| {s['via_ttft_p50_ms']:.0f} / {s['via_ttft_p99_ms']:.0f} "
            f"| {s['direct_ttft_p50_ms']:.0f} "
            f"| {s['via_outside_p50_ms']:.1f} / {s['via_outside_p99_ms']:.1f} "
            f"| {s['direct_outside_p50_ms']:.1f} / {s['direct_outside_p99_ms']:.1f} "
            f"| {s['added_p50_ms']:.1f} / {s['added_p99_ms']:.1f} "
            f"| {s['router_cpu_cores']:.2f}; {s['router_cpu_ms_per_request']:.1f} "
            f"| {s['emulator_cpu_cores']:.2f} | {s['loadavg']:.1f} |")
    return "\n".join(lines)


def breakdown_table(steps: Sequence[dict[str, Any]]) -> str:
    """Markdown rows of what the router's own histograms saw during each ``ceiling`` step
    (steps measured before they were recorded, or of another router, are left out)."""
    lines = ["| rate /s | added p99 (ms) | decision p50 / p99 (ms, ≤) | loop lag p99 (ms, ≤) "
             "| lag samples ≥ 5 ms | GC passes gen 0 / 1 / 2 (≥ 5 ms) | prefill waits |",
             "|" + "---|" * 7]
    for s in steps:
        if not s.get("loop_lag_samples") and not s.get("gc_passes"):
            continue
        gc_passes = s.get("gc_passes") or {}
        lines.append(
            f"| {s['rate']:g} | {s['added_p99_ms']:.1f} "
            f"| {s['decision_p50_ms']:g} / {s['decision_p99_ms']:g} "
            f"| {s['loop_lag_p99_ms']:g} "
            f"| {s['loop_lag_over_5ms']} of {s['loop_lag_samples']} "
            f"| {' / '.join(str(gc_passes.get(g, 0)) for g in ('0', '1', '2'))} "
            f"({s['gc_over_5ms']}) | {s['prefill_waits']} |")
    return "\n".join(lines)


def plot(cpu_rows: Sequence[tuple[str, dict[str, Any]]], steps: Sequence[dict[str, Any]],
         path: Path) -> None:
    """Left: router CPU per request by run; right (with ceiling steps): added latency by rate
    step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if steps:
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5))
    else:  # CPU runs only (e.g. contenders side by side)
        fig, left = plt.subplots(1, 1, figsize=(8, 1.2 + 0.38 * len(cpu_rows)))
    labels = [label for label, _ in cpu_rows]
    net = [r["net_cpu_ms_per_request"] for _, r in cpu_rows]
    idle = [r["gross_cpu_ms_per_request"] - r["net_cpu_ms_per_request"] for _, r in cpu_rows]
    left.barh(labels, net, label="per request (net of idle)")
    left.barh(labels, idle, left=net, label="idle share (scrapes, subscribers)")
    left.axvline(1.0, color="k", linestyle="--", linewidth=1, label="target 1 ms")
    left.set_xlabel("router CPU ms per request")
    left.invert_yaxis()
    if not steps:
        left.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    rates = [s["rate"] for s in steps]
    right.plot(rates, [s["added_p50_ms"] for s in steps], "o-", label="added p50")
    right.plot(rates, [s["added_p99_ms"] for s in steps], "s-", label="added p99")
    right.plot(rates, [s["direct_outside_p99_ms"] for s in steps], "x:",
               label="direct: outside-engine p99 (noise floor)")
    right.axhline(5.0, color="k", linestyle="--", linewidth=1, label="5 ms")
    right.set_xlabel("request rate through the router (/s)")
    right.set_ylabel("ms")
    right.set_yscale("symlog", linthresh=10)
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    for name in ("cpu", "ceiling"):  # "report" is added below
        p = sub.add_parser(name)
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop",
                       help="the router's event loop (kvroute router --event-loop)")
        p.add_argument("--contender", default="kvroute-precise",
                       help="the router measured: a contender of kvroute bench with a router "
                            "process (kvroute-precise, sglang-router-cache, smg-cache, "
                            "vllm-router-kv, envoy-rr, ...), or python-floor (a do-nothing "
                            "Python proxy, bench/floor_proxy.py)")
        p.add_argument("--bench-venv", default=None,
                       help="the peers' venv (default: $KVROUTE_BENCH_VENV, else "
                            "scripts/kvenv.sh bench)")
        p.add_argument("--tenants", type=int, default=16)
        p.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                       help="one more flag for kvroute router, after the contender's own "
                            "(repeatable; e.g. --router-arg=--scrape-interval-ms=1000)")
        p.add_argument("--json", type=Path, help="also write the result here")
    cpu = sub.choices["cpu"]
    cpu.add_argument("--engines", type=int, default=16)
    cpu.add_argument("--profile", default="h100-llama8b")
    cpu.add_argument("--requests", type=int, default=400)
    cpu.add_argument("--warmup", type=int, default=40)
    cpu.add_argument("--rate", type=float, default=20.0)
    cpu.add_argument("--output-tokens", type=int, default=64)
    cpu.add_argument("--context", type=int, default=6000, help="shared tokens per tenant")
    cpu.add_argument("--max-context", type=int, default=8192)
    cpu.add_argument("--idle-seconds", type=float, default=10.0)
    cpu.add_argument("--py-spy", help="record a raw py-spy profile of the measured window")
    ceiling = sub.choices["ceiling"]
    ceiling.add_argument("--engines", type=int, default=64)
    ceiling.add_argument("--rates", type=lambda s: [float(v) for v in s.split(",")],
                         default=[10.0, 20.0, 30.0, 40.0, 60.0])
    ceiling.add_argument("--seconds", type=float, default=20.0, help="per rate step")
    ceiling.add_argument("--min-requests", type=int, default=200,
                         help="routed requests per step at least (a step at a low rate "
                              "lasts longer than --seconds): enough for a p99")
    ceiling.add_argument("--warmup", type=int, default=64)
    ceiling.add_argument("--output-tokens", type=int, default=2)
    ceiling.add_argument("--context", type=int, default=6800, help="shared tokens per tenant")
    ceiling.add_argument("--max-context", type=int, default=8192)
    ceiling.add_argument("--added-limit-ms", type=float, default=5.0)
    ceiling.add_argument("--overload-s", type=float, default=2.0,
                         help="stop stepping once the routed TTFT p50 passes this")
    report = sub.add_parser("report", help="markdown tables and the plot from saved JSONs")
    report.add_argument("--cpu", nargs="*", default=[], metavar="LABEL=FILE")
    report.add_argument("--ceiling", type=Path)
    report.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    if args.part == "report":
        rows = [(spec.split("=", 1)[0], json.loads(Path(spec.split("=", 1)[1]).read_text())[
            "result"]) for spec in args.cpu]
        steps = json.loads(args.ceiling.read_text())["steps"] if args.ceiling else []
        if rows:
            print(cpu_table(rows) + "\n")
        if steps:
            print(ceiling_table(steps) + "\n")
            print(breakdown_table(steps))
        if args.plot:
            plot(rows, steps, args.plot)
        return
    meta = {"part": args.part, "argv": sys.argv[1:], "cpus": os.cpu_count(),
            "loadavg_start": loadavg(), "python": sys.version.split()[0],
            "event_loop": args.event_loop, "contender": args.contender}
    if args.part == "cpu":
        result: dict[str, Any] = {"meta": meta, "result": asdict(measure_cpu(args))}
    else:
        steps = measure_ceiling(args)
        result = {"meta": meta, "steps": [asdict(s) for s in steps],
                  "ceiling_rate": ceiling_of(steps, args.added_limit_ms)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
