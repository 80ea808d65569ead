"""Router overhead vs fleet size and prompt length, and prefix-index memory vs blocks tracked.

Issue 8 item 4. One command measures and writes ``docs/benchmarks/router-overhead.md`` (the
64-endpoint sections of ``bench/decision_path.py``, re-measured, plus the sweep), a JSON with
the raw numbers and a PNG plot beside it:

1. **Sweep**: for each endpoint count (8 … 512) by prompt length (256, 1,024, 4,096 token ids)
   by prefix scorer (``prefix-approx``: the router's own history; ``prefix-precise``: the
   KV-event index), the decision (``Director.route`` + ``dispatch``, in process, one thread)
   p50/p99 in wall and CPU time (``time.thread_time``) and decisions/s on one core, then the
   ``kvroute.v1.Router/Pick`` round trip over a real loopback gRPC channel (the router's gRPC
   server, client in the same process) p50/p99. Scorers as the default policy: prefix (3) +
   queue-depth (1) + kv-utilization (1), max-score picker. Workload (seeded): 64 tenants, each
   prompt = its tenant's shared prefix (3/4 of the prompt) + fresh tokens; the approximate
   history is warmed by routing requests; the precise index is filled with synthetic
   ``BlockStored`` events (msgpack-encoded, decoded and applied as the subscriber does): every
   tenant's prefix blocks on 2 endpoints plus filler blocks up to ``--fill-blocks`` per
   endpoint, and its subscribers count as in sequence (no sockets).
2. **Memory**: ``tracemalloc`` bytes of a fresh ``ApproxPrefixIndex`` and ``PrefixIndex`` after
   recording 10k / 100k / 1M (endpoint, block) entries over 64 endpoints (chains of 64 blocks,
   each chain on 2 endpoints, fresh int objects per endpoint as in production).

The machine is shared, so every cell runs ``--rounds`` rounds and the least disturbed is
reported (wall figures from the round with the lowest wall p50, CPU figures from the round with
the lowest CPU p50); the load average is sampled per cell.

    python bench/overhead_sweep.py --write docs/benchmarks/router-overhead.md
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import random
import sys
import time
import tracemalloc
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ENDPOINT_COUNTS = (8, 16, 32, 64, 128, 256, 512)
PROMPT_TOKENS = (256, 1024, 4096)
SCORERS = ("approx", "precise")
MEMORY_BLOCKS = (10_000, 100_000, 1_000_000)
TENANTS = 64
PREFIX_SHARE = 0.75
TENANT_REPLICAS = 2
TOKEN_BLOCK = 16
VOCAB = 50_000
CHAIN_BLOCKS = 64
MEMORY_ENDPOINTS = 64
SCORER_TYPES = {"approx": "prefix-approx", "precise": "prefix-precise"}


@dataclass(frozen=True)
class SweepConfig:
    endpoints: tuple[int, ...] = ENDPOINT_COUNTS
    prompt_tokens: tuple[int, ...] = PROMPT_TOKENS
    scorers: tuple[str, ...] = SCORERS
    iterations: int = 300
    grpc_iterations: int = 200
    rounds: int = 3
    warm_requests: int = 256
    fill_blocks: int = 1024
    memory_blocks: tuple[int, ...] = MEMORY_BLOCKS
    memory_endpoints: int = MEMORY_ENDPOINTS
    seed: int = 20261122


@dataclass
class Cell:
    """One (scorer, endpoints, prompt length) measurement, least-disturbed rounds."""

    scorer: str
    endpoints: int
    prompt_tokens: int
    iterations: int
    rounds: int
    wall_p50_us: float
    wall_p99_us: float
    cpu_p50_us: float
    cpu_p99_us: float
    cpu_mean_us: float
    decisions_per_s: float
    decisions_per_cpu_s: float
    grpc_p50_us: float
    grpc_p99_us: float
    grpc_cpu_mean_us: float
    grpc_iterations: int
    match_ratio_mean: float
    precise_scored_share: float | None
    index_entries: int
    load_avg_1m: float
    seconds: float
    round_wall_p50_us: list[float] = field(default_factory=list)
    round_cpu_p50_us: list[float] = field(default_factory=list)
    round_grpc_p50_us: list[float] = field(default_factory=list)


# -- helpers ------------------------------------------------------------------------------------
def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _tokens(rng: Any, count: int) -> list[int]:
    result: list[int] = rng.integers(0, VOCAB, size=count).tolist()
    return result


def _policy_and_pool(endpoints: int, scorer: str) -> tuple[Any, Any]:
    from kvroute_api.inference_pool import InferencePool
    from kvroute_api.route_policy import RoutePolicy

    pool = InferencePool.model_validate({
        "kind": "InferencePool", "metadata": {"name": "big"},
        "spec": {"mode": "External", "model": {"name": "m"}, "resources": {"gpus": 0},
                 "engine": {"blockSize": TOKEN_BLOCK},
                 # a selected (Kubernetes-mode) pool: static endpoint lists stop at 256
                 "selector": {"matchLabels": {"app": "engine"}}}}, by_alias=True)
    policy = RoutePolicy.model_validate({
        "kind": "RoutePolicy", "metadata": {"name": "chat"},
        "spec": {"match": {"model": "chat"}, "pools": [{"name": "big"}],
                 "scoring": {"scorers": [{"type": SCORER_TYPES[scorer], "weight": 3.0},
                                         {"type": "queue-depth", "weight": 1.0},
                                         {"type": "kv-utilization", "weight": 1.0}]}}},
        by_alias=True)
    return pool, policy


def _trusted_events_class() -> Any:
    from kvroute_router.kvevents.hub import PoolKVEvents

    class TrustedEvents(PoolKVEvents):
        """Every endpoint's subscriber counts as connected and in sequence (no sockets)."""

        def trustworthy(self, endpoint: str) -> bool:
            return True

    return TrustedEvents


def build_director(endpoints: int, scorer: str) -> tuple[Any, Any]:
    """A director over one pool of ``endpoints``; for ``precise`` also its ``PoolKVEvents``."""
    from kvroute_router.datastore.store import Datastore, EndpointSpec
    from kvroute_router.director import Director
    from kvroute_router.framework.registry import PluginRegistry, SharedServices
    from kvroute_router.plugins import register_builtin_plugins

    pool, policy = _policy_and_pool(endpoints, scorer)
    store = Datastore()
    store.replace([pool], [policy])
    (state,) = store.pools()
    store.set_pool_endpoints(state.key, [
        EndpointSpec(name=f"e{i}", address=f"10.{i // 62500}.{i // 250 % 250}.{i % 250}:8000")
        for i in range(endpoints)])
    registry = register_builtin_plugins(PluginRegistry())
    services = SharedServices()
    events = None
    if scorer == "precise":
        from kvroute_router.kvevents.feed import register_precise_prefix, services_key
        from kvroute_router.kvevents.hub import hash_config_for_pool

        if not register_precise_prefix(registry):
            raise RuntimeError("prefix-precise is unavailable in this environment")
        events = _trusted_events_class()(hash_config_for_pool(pool))
        services.put(services_key(state.key), events)
    return Director(store, registry, services=services, rng=random.Random(1)), events


def refresh_metrics(director: Any, rng: random.Random) -> None:
    from kvroute_router.framework.endpoint import EndpointMetrics

    now = time.monotonic()
    for ep in director.datastore.endpoints():
        ep.metrics = EndpointMetrics(running=rng.randrange(8), waiting=rng.randrange(4),
                                     kv_cache_usage=rng.random(), scraped_at=now)


def block_stored_payload(chains: Sequence[Sequence[int]], ts: float = 0.0) -> bytes:
    """One vLLM KV-event batch (msgpack ``[ts, events, dp_rank]``) of ``BlockStored`` events,
    one per chain of block hashes."""
    import msgspec
    from kvroute_router.kvevents.events import BlockStored

    events = []
    for chain in chains:
        events.append(BlockStored(block_hashes=list(chain), parent_block_hash=None,
                                  block_size=TOKEN_BLOCK, medium="GPU"))
    return msgspec.msgpack.encode((ts, events, None))


def apply_events(index: Any, endpoint: str, payload: bytes, seq: int = 0) -> int:
    """Decode a batch and apply its ``BlockStored`` events to the index as the subscriber does
    (``KVEventSubscriber._apply``); returns the blocks stored."""
    from kvroute_router.kvevents.events import BlockStored, decode_batch, event_hashes, indexable

    stored = 0
    for event in decode_batch(seq, payload).events:
        if isinstance(event, BlockStored) and indexable(event):
            hashes = event_hashes(event.block_hashes)
            index.store(endpoint, hashes)
            stored += len(hashes)
    return stored


class Workload:
    """Seeded multi-tenant prompts: tenant prefix (``PREFIX_SHARE``) + fresh tokens."""

    def __init__(self, prompt_tokens: int, seed: int) -> None:
        import numpy as np

        self.rng = np.random.default_rng(seed)
        self.pick = random.Random(seed)
        self.prompt_tokens = prompt_tokens
        prefix = int(prompt_tokens * PREFIX_SHARE) // TOKEN_BLOCK * TOKEN_BLOCK
        self.prefixes = [_tokens(self.rng, prefix) for _ in range(TENANTS)]

    def request(self) -> tuple[int, list[int]]:
        tenant = self.pick.randrange(TENANTS)
        prefix = self.prefixes[tenant]
        return tenant, prefix + _tokens(self.rng, self.prompt_tokens - len(prefix))


def fill_precise_index(events: Any, workload: Workload, endpoints: int, fill_blocks: int,
                       rng: random.Random) -> None:
    """Synthetic ``BlockStored`` events: each tenant's prefix blocks on ``TENANT_REPLICAS``
    endpoints, then filler chains (blocks no prompt matches) up to ``fill_blocks`` per endpoint."""
    from kvroute_router.kvevents.hashing import BlockHasher

    hasher = BlockHasher(events.hasher.config)  # a separate memo: the router's starts cold
    names = [f"e{i}" for i in range(endpoints)]
    chains: dict[str, list[list[int]]] = {name: [] for name in names}
    for prefix in workload.prefixes:
        hashes = hasher.block_hashes(prefix)
        for name in rng.sample(names, min(TENANT_REPLICAS, endpoints)):
            chains[name].append(hashes)
    for seq, name in enumerate(names):
        held = sum(len(c) for c in chains[name])
        while held < fill_blocks:
            size = min(CHAIN_BLOCKS, fill_blocks - held)
            chains[name].append([rng.getrandbits(64) for _ in range(size)])
            held += size
        apply_events(events.index, name, block_stored_payload(chains[name]), seq)


# -- the sweep -----------------------------------------------------------------------------------
async def _route_once(director: Any, request: Any) -> tuple[Any, Any]:
    decision = await director.route(request)
    target = decision.endpoints[0]
    director.dispatch(decision, target)
    return decision, target


async def measure_cell(config: SweepConfig, scorer: str, endpoints: int,
                       prompt_tokens: int) -> Cell:
    from kvroute_router.director import Outcome
    from kvroute_router.framework.request import LLMRequest
    from kvroute_router.grpcapi.client import RouterClient
    from kvroute_router.grpcapi.server import start_router_grpc_server
    from kvroute_router.proto_gen import router_pb2 as pb

    started = time.perf_counter()
    seed = config.seed + 7919 * endpoints + prompt_tokens + (0 if scorer == "approx" else 1)
    rng = random.Random(seed)
    workload = Workload(prompt_tokens, seed)
    director, events = build_director(endpoints, scorer)
    refresh_metrics(director, rng)
    if events is not None:
        fill_precise_index(events, workload, endpoints, config.fill_blocks, rng)

    async def run(count: int, timed: bool) -> tuple[list[float], list[float], float, float]:
        wall: list[float] = []
        cpu: list[float] = []
        ratios: list[float] = []
        requests = [LLMRequest(model="chat", token_ids=workload.request()[1])
                    for _ in range(count)]
        t_start = time.perf_counter()
        for i, request in enumerate(requests):
            if i % 500 == 0:
                refresh_metrics(director, rng)
            c0 = time.thread_time()
            t0 = time.perf_counter()
            decision, target = await _route_once(director, request)
            t1 = time.perf_counter()
            c1 = time.thread_time()
            if timed:
                wall.append(t1 - t0)
                cpu.append(c1 - c0)
                ratios.append(decision.prefix_match_ratio(target) or 0.0)
            director.end_attempt(decision, target)
            director.finish(decision, target, Outcome(status=200))
        elapsed = time.perf_counter() - t_start
        return wall, cpu, elapsed, sum(ratios) / len(ratios) if ratios else 0.0

    await run(config.warm_requests, timed=False)
    precise_before, approx_before = _scored_by_source(events)
    rounds = []
    for _ in range(config.rounds):
        rounds.append(await run(config.iterations, timed=True))
    precise_after, approx_after = _scored_by_source(events)
    by_wall = min(rounds, key=lambda r: quantile(r[0], 0.5))
    by_cpu = min(rounds, key=lambda r: quantile(r[1], 0.5))

    server, port = await start_router_grpc_server(director, "127.0.0.1", 0,
                                                  catalog=director.datastore)
    grpc_rounds: list[tuple[list[float], float]] = []
    try:
        async with RouterClient(f"127.0.0.1:{port}") as client:
            for _ in range(2):  # channel and handler warm-up, not timed
                reply = await client.pick(pb.PickRequest(
                    model="chat", token_ids=pb.TokenIds(ids=workload.request()[1])))
                await client.report(pb.ReportRequest(decision_id=reply.decision_id, status=200))
            for _ in range(config.rounds):
                picks = [pb.PickRequest(model="chat",
                                        token_ids=pb.TokenIds(ids=workload.request()[1]))
                         for _ in range(config.grpc_iterations)]
                latencies: list[float] = []
                cpu_total = 0.0
                for i, pick in enumerate(picks):
                    if i % 500 == 0:
                        refresh_metrics(director, rng)
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    reply = await client.pick(pick)
                    latencies.append(time.perf_counter() - t0)
                    cpu_total += time.process_time() - c0
                    await client.report(pb.ReportRequest(decision_id=reply.decision_id,
                                                         status=200))
                grpc_rounds.append((latencies, cpu_total / len(picks)))
    finally:
        await server.stop(None)
    grpc_best = min(grpc_rounds, key=lambda r: quantile(r[0], 0.5))

    precise_share = None
    if events is not None:
        precise = precise_after - precise_before
        scored = precise + approx_after - approx_before
        precise_share = precise / scored if scored else 0.0
    index_entries = (events.index.entries() if events is not None
                     else _approx_entries(director))
    return Cell(
        scorer=scorer, endpoints=endpoints, prompt_tokens=prompt_tokens,
        iterations=config.iterations, rounds=config.rounds,
        wall_p50_us=quantile(by_wall[0], 0.5) * 1e6, wall_p99_us=quantile(by_wall[0], 0.99) * 1e6,
        cpu_p50_us=quantile(by_cpu[1], 0.5) * 1e6, cpu_p99_us=quantile(by_cpu[1], 0.99) * 1e6,
        cpu_mean_us=sum(by_cpu[1]) / len(by_cpu[1]) * 1e6,
        decisions_per_s=len(by_wall[0]) / by_wall[2],
        decisions_per_cpu_s=len(by_cpu[1]) / sum(by_cpu[1]),
        grpc_p50_us=quantile(grpc_best[0], 0.5) * 1e6,
        grpc_p99_us=quantile(grpc_best[0], 0.99) * 1e6,
        grpc_cpu_mean_us=grpc_best[1] * 1e6, grpc_iterations=config.grpc_iterations,
        match_ratio_mean=sum(r[3] for r in rounds) / len(rounds),
        precise_scored_share=precise_share, index_entries=index_entries,
        load_avg_1m=os.getloadavg()[0], seconds=time.perf_counter() - started,
        round_wall_p50_us=[quantile(r[0], 0.5) * 1e6 for r in rounds],
        round_cpu_p50_us=[quantile(r[1], 0.5) * 1e6 for r in rounds],
        round_grpc_p50_us=[quantile(r[0], 0.5) * 1e6 for r in grpc_rounds])


def _scored_by_source(events: Any) -> tuple[float, float]:
    """Endpoints the precise scorer rated from the index and by the approximate fallback."""
    if events is None:
        return 0.0, 0.0
    get = events.metrics.registry.get_sample_value
    name = "kvroute_kv_prefix_scorer_source_total"
    return (float(get(name, {"source": "precise"}) or 0.0),
            float(get(name, {"source": "approximate"}) or 0.0))


def _approx_entries(director: Any) -> int:
    from kvroute_router.plugins.prefix_approx import ApproxPrefixIndex, services_key

    (state,) = director.datastore.pools()
    index = director.services.get(services_key(state.key), ApproxPrefixIndex)
    return int(index.blocks()) if index is not None else 0


async def run_sweep(config: SweepConfig,
                    progress: Callable[[int, int, Cell], None] | None = None) -> list[Cell]:
    cells = []
    grid = [(s, n, t) for t in config.prompt_tokens for n in config.endpoints
            for s in config.scorers]
    for number, (scorer, endpoints, tokens) in enumerate(grid, 1):
        cell = await measure_cell(config, scorer, endpoints, tokens)
        gc.collect()
        cells.append(cell)
        if progress is not None:
            progress(number, len(grid), cell)
    return cells


# -- memory --------------------------------------------------------------------------------------
def _chains(entries: int, endpoints: int, seed: int) -> list[tuple[array[int], list[str]]]:
    """Chains of ``CHAIN_BLOCKS`` hashes, each on ``TENANT_REPLICAS`` endpoints, adding up to
    ``entries`` (endpoint, block) pairs."""
    rng = random.Random(seed)
    names = [f"e{i}" for i in range(endpoints)]
    out = []
    left = entries
    while left > 0:
        replicas = TENANT_REPLICAS if left >= TENANT_REPLICAS else 1
        size = min(CHAIN_BLOCKS, left // replicas)
        holders = rng.sample(names, replicas)
        out.append((array("Q", [rng.getrandbits(64) for _ in range(size)]), holders))
        left -= size * len(holders)
    return out


def measure_memory(kind: str, entries: int, endpoints: int, seed: int) -> dict[str, Any]:
    """Traced bytes of one index holding ``entries`` (endpoint, block) pairs."""
    from kvroute_router.kvevents.index import PrefixIndex
    from kvroute_router.plugins.prefix_approx import ApproxPrefixIndex

    chains = _chains(entries, endpoints, seed)
    # first use outside the trace: lazy imports and decoder set-up are not the index's bytes
    apply_events(PrefixIndex(), "warm-up", block_stored_payload([[1, 2]]))
    ApproxPrefixIndex().record("warm-up", [1, 2])
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        index: Any
        if kind == "approx":
            index = ApproxPrefixIndex(max_blocks_per_endpoint=1 << 30)
            for hashes, holders in chains:
                for name in holders:
                    # signed 64-bit keys like hash(); a fresh list of fresh ints per dispatch
                    index.record(name, [h - (1 << 63) for h in hashes])
            tracked, distinct = index.blocks(), sum(len(h) for h, _ in chains)
        else:
            index = PrefixIndex()
            for seq, (hashes, holders) in enumerate(chains):
                for name in holders:
                    apply_events(index, name, block_stored_payload([hashes.tolist()]), seq)
            tracked, distinct = index.entries(), index.distinct_blocks()
        build_s = time.perf_counter() - t0
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    del index
    return {"index": kind, "entries": tracked, "distinct_blocks": distinct,
            "endpoints": endpoints, "bytes": used, "bytes_per_entry": used / tracked,
            "bytes_per_distinct_block": used / distinct, "build_s_traced": build_s}


def run_memory(config: SweepConfig) -> list[dict[str, Any]]:
    rows = []
    for entries in config.memory_blocks:
        for kind in ("approx", "precise"):
            rows.append(measure_memory(kind, entries, config.memory_endpoints, config.seed))
            gc.collect()
    return rows


# -- report --------------------------------------------------------------------------------------
SCORER_LABEL = {"approx": "approximate (`prefix-approx`)",
                "precise": "precise (`prefix-precise`, KV-event index)"}


def _fmt(value: float) -> str:
    return f"{value:,.0f}"


def sweep_tables(cells: Sequence[Cell]) -> list[str]:
    lines: list[str] = []
    scorers = sorted({c.scorer for c in cells}, key=SCORERS.index)
    for scorer in scorers:
        lines += [f"### {SCORER_LABEL[scorer]}", "",
                  "| endpoints | prompt (tokens) | wall p50 (µs) | wall p99 (µs) | CPU p50 (µs) "
                  "| CPU p99 (µs) | decisions/s (one core) | gRPC Pick p50 (µs) "
                  "| gRPC Pick p99 (µs) | gRPC Pick CPU mean (µs) | prefix match of pick |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = sorted((c for c in cells if c.scorer == scorer),
                      key=lambda c: (c.prompt_tokens, c.endpoints))
        for c in rows:
            lines.append(
                f"| {c.endpoints} | {c.prompt_tokens:,} | {_fmt(c.wall_p50_us)} | "
                f"{_fmt(c.wall_p99_us)} | {_fmt(c.cpu_p50_us)} | {_fmt(c.cpu_p99_us)} | "
                f"{_fmt(c.decisions_per_cpu_s)} | {_fmt(c.grpc_p50_us)} | "
                f"{_fmt(c.grpc_p99_us)} | {_fmt(c.grpc_cpu_mean_us)} | "
                f"{c.match_ratio_mean:.2f} |")
        lines.append("")
    return lines


def memory_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| index | entries (endpoint, block) | distinct blocks | traced memory (MiB) "
             "| bytes per entry | bytes per distinct block |", "|---|---|---|---|---|---|"]
    for row in rows:
        name = ("approximate history (`ApproxPrefixIndex`)" if row["index"] == "approx"
                else "KV-event index (`PrefixIndex`)")
        lines.append(f"| {name} | {row['entries']:,} | {row['distinct_blocks']:,} | "
                     f"{row['bytes'] / 2**20:,.1f} | {row['bytes_per_entry']:.0f} | "
                     f"{row['bytes_per_distinct_block']:.0f} |")
    return lines


def plot(cells: Sequence[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    panels = (("cpu_p50_us", "decision p50, CPU time (µs)"),
              ("cpu_p99_us", "decision p99, CPU time (µs)"),
              ("grpc_p50_us", "gRPC Pick round trip p50, wall (µs)"),
              ("grpc_cpu_mean_us", "gRPC Pick CPU per pick, client + server (µs)"))
    fig, grid = plt.subplots(2, 2, figsize=(13, 9))
    styles = {"approx": "-", "precise": "--"}
    tokens = sorted({c.prompt_tokens for c in cells})
    counts = sorted({c.endpoints for c in cells})
    colours = dict(zip(tokens, ("tab:blue", "tab:orange", "tab:green", "tab:red",
                                "tab:purple"), strict=False))
    for ax, (key, title) in zip(grid.flat, panels, strict=True):
        for scorer in sorted({c.scorer for c in cells}, key=SCORERS.index):
            for t in tokens:
                row = sorted((c for c in cells if c.scorer == scorer and c.prompt_tokens == t),
                             key=lambda c: c.endpoints)
                ax.plot([c.endpoints for c in row], [getattr(c, key) for c in row],
                        styles[scorer], marker="o", color=colours.get(t),
                        label=f"{scorer}, {t:,} tokens")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(counts)
        for axis, minor in ((ax.xaxis, False), (ax.yaxis, False), (ax.yaxis, True)):
            formatter = ScalarFormatter()
            formatter.set_scientific(False)
            if minor:
                axis.set_minor_formatter(formatter)
            else:
                axis.set_major_formatter(formatter)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("endpoints in the pool")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    grid.flat[0].legend(fontsize=8)
    fig.suptitle("kvroute router overhead vs pool size (solid: prefix-approx, dashed: "
                 "prefix-precise); 2 shared cores")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _load_line(loads: Sequence[float]) -> str:
    return (f"1-minute load average during the sweep {min(loads):.1f}-{max(loads):.1f} "
            f"(mean {sum(loads) / len(loads):.1f})")


def linear_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; returns (a, b)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - b * mx, b


def scaling_rows(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """Per (scorer, prompt length): the fixed and per-endpoint parts of the decision's CPU p50,
    the largest pool whose CPU p99 stays under 1 ms, and the gRPC Pick's extra CPU."""
    rows = []
    for scorer in sorted({c.scorer for c in cells}, key=SCORERS.index):
        for t in sorted({c.prompt_tokens for c in cells}):
            row = sorted((c for c in cells if c.scorer == scorer and c.prompt_tokens == t),
                         key=lambda c: c.endpoints)
            fixed, per_endpoint = linear_fit([(c.endpoints, c.cpu_p50_us) for c in row])
            under = [c.endpoints for c in row if c.cpu_p99_us < 1000]
            rows.append({"scorer": scorer, "prompt_tokens": t, "fixed_us": fixed,
                         "per_endpoint_us": per_endpoint,
                         "max_endpoints_cpu_p99_under_1ms": max(under) if under else None,
                         "grpc_extra_cpu_us": {c.endpoints: c.grpc_cpu_mean_us - c.cpu_mean_us
                                               for c in row}})
    return rows


def scaling_table(cells: Sequence[Cell]) -> list[str]:
    rows = scaling_rows(cells)
    counts = sorted({c.endpoints for c in cells})
    lo, hi = counts[0], counts[-1]
    lines = ["| scorer | prompt (tokens) | decision CPU p50 ≈ fixed + per endpoint (µs) "
             "| break-even pool (per-endpoint part = fixed part) "
             "| largest pool with CPU p99 < 1 ms | gRPC Pick extra CPU over the decision, "
             f"{lo} / {hi} endpoints (µs) |", "|---|---|---|---|---|---|"]
    for r in rows:
        extra = r["grpc_extra_cpu_us"]
        under = r["max_endpoints_cpu_p99_under_1ms"]
        even = (f"{r['fixed_us'] / r['per_endpoint_us']:,.0f}" if r["per_endpoint_us"] > 0
                else "-")
        lines.append(f"| {r['scorer']} | {r['prompt_tokens']:,} | {r['fixed_us']:,.0f} + "
                     f"{r['per_endpoint_us']:.2f} x endpoints | {even} | "
                     f"{'none' if under is None else under} | "
                     f"{extra[lo]:,.0f} / {extra[hi]:,.0f} |")
    return lines


READING = (
    "Reading. A decision is a fixed part plus a part linear in the pool size. The fixed part is "
    "mostly cutting the prompt into blocks: `prefix-approx` hashes 64-token blocks with "
    "Python's `hash`, so prompt length adds little; `prefix-precise` computes vLLM's SHA-256/CBOR "
    "hash of every 16-token block (the tenants' shared prefixes come from the hasher's block "
    "memo, the fresh tokens are hashed each time), so its fixed part grows with the prompt's new "
    "tokens, and the index match itself is O(prompt blocks) whatever the index holds. The "
    "per-endpoint part is the filters, the three scorers' loops and the picker over every "
    "endpoint, plus, for `prefix-precise`, a trust check per endpoint, the per-endpoint match "
    "result and the pending-mark purge that visits every endpoint; it does not depend on the "
    "prompt length, so in pools larger than the table's break-even column it dominates. The "
    "gRPC "
    "Pick adds a loopback round trip, protobuf (de)serialisation of the token ids, and a "
    "response that carries every ranked endpoint's scores and a `reasons()` line per endpoint; "
    "the last column of the table shows how much of that extra CPU is a fixed per-RPC cost and "
    "how much grows with the pool. {wall} Memory is linear in the (endpoint, block) entries: "
    "the approximate history keeps an LRU `OrderedDict` per endpoint and a holder `dict` per "
    "distinct key, the KV-event index a plain per-endpoint `dict` and one global "
    "hash → endpoint-bitmask `dict`, about half the bytes per entry.")


def sweep_section(results: dict[str, Any], png_name: str, json_name: str) -> list[str]:
    cells = [Cell(**c) for c in results["cells"]]
    cfg = results["config"]
    loads = [c.load_avg_1m for c in cells]
    lines = ["## Sweep: endpoints, prompt length, prefix scorer", "",
             f"{cfg['iterations']} decisions and {cfg['grpc_iterations']} gRPC Picks per round, "
             f"{cfg['rounds']} rounds per cell (wall figures from the round with the lowest wall "
             "p50, CPU figures from the round with the lowest CPU p50); "
             f"{_load_line(loads)}. Scorers: prefix (3) + queue-depth (1) + kv-utilization (1), "
             f"max-score picker, all endpoints healthy with fresh random load metrics. {TENANTS} "
             f"tenants; a prompt is its tenant's prefix ({PREFIX_SHARE:.0%}) + fresh token ids. "
             f"Approximate: the history is warmed by {cfg['warm_requests']} routed requests. "
             f"Precise: the index is filled by synthetic `BlockStored` events (each tenant's "
             f"prefix on {TENANT_REPLICAS} endpoints, filler up to {cfg['fill_blocks']:,} blocks "
             "per endpoint), every endpoint trusted, the same warm-up; dispatches mark pending "
             "blocks as in production. *Prefix match of pick*: mean share of the prompt the "
             "chosen endpoint held (the ideal is ≈ 0.75); decisions/s (one core) = 1 / mean "
             "CPU time. gRPC Pick: wall round trip, client and server in one process and one "
             "event loop.", "", f"![latency vs endpoints]({png_name})", "",
             f"Raw numbers (every round, load per cell): [{json_name}]({json_name}).", ""]
    lines += sweep_tables(cells)
    return lines


def memory_section(results: dict[str, Any]) -> list[str]:
    rows = results["memory"]
    if not rows:
        return []
    endpoints = rows[0]["endpoints"]
    return ["## Index memory vs blocks tracked", "",
            f"`tracemalloc` bytes of a fresh index after recording the entries over {endpoints} "
            f"endpoints (chains of {CHAIN_BLOCKS} blocks, each chain on {TENANT_REPLICAS} "
            "endpoints, so distinct blocks = entries / 2). Approximate: `ApproxPrefixIndex."
            "record` with a fresh list of 64-bit keys per dispatch; precise: msgpack "
            "`BlockStored` batches decoded and applied to `PrefixIndex.store` as the subscriber "
            "does. Per-endpoint bounds (approximate 32,768 keys, precise 1,048,576 blocks by "
            "default) cap the totals; the precise scorer also keeps the hasher's block memo "
            "and records every dispatch in the approximate history too (its fallback); "
            "neither is counted here.", "", *memory_table(rows), ""]


def reading(results: dict[str, Any]) -> list[str]:
    cells = [Cell(**c) for c in results["cells"]]
    lines = ["### How it scales", "",
             "Least-squares fit of the decision's CPU p50 over the endpoint counts measured; "
             "the gRPC column is the Pick's mean CPU (client and server, one process) minus the "
             "decision's mean CPU.", "", *scaling_table(cells), ""]
    mem = results["memory"]
    if mem:
        big = max(r["entries"] for r in mem)
        per = {r["index"]: r["bytes_per_entry"] for r in mem if r["entries"] == big}
        lines += [f"At {big:,} entries the approximate history takes "
                  f"{per.get('approx', 0):.0f} B and the KV-event index "
                  f"{per.get('precise', 0):.0f} B per (endpoint, block) entry.", ""]
    wall99 = [c.wall_p99_us for c in cells]
    cpu99 = [c.cpu_p99_us for c in cells]
    off_cpu = [c for c in cells if c.wall_p50_us > 1.5 * c.cpu_p50_us]
    wall = (f"Wall p99 is {min(wall99):,.0f}-{max(wall99):,.0f} µs across the cells while CPU "
            f"p99 is {min(cpu99):,.0f}-{max(cpu99):,.0f} µs: with the 2 cores shared at the load "
            "averages above, a decision is often descheduled for a whole scheduler time slice, "
            "so the wall tails (and the gRPC wall figures) measure the machine more than the "
            "router.")
    if off_cpu:
        wall += (" In " + ", ".join(f"{c.scorer} {c.endpoints} endpoints {c.prompt_tokens:,} "
                                    f"tokens" for c in off_cpu)
                 + " even the wall p50 is over 1.5 times the CPU p50: off-CPU time, not the "
                 "router's work.")
    return [*lines, READING.format(wall=wall), ""]


# -- main ----------------------------------------------------------------------------------------
def _progress_line(number: int, total: int, cell: Cell) -> None:
    print(f"[{number:>2}/{total}] {cell.scorer:<7} {cell.endpoints:>3} endpoints "
          f"{cell.prompt_tokens:>5} tokens: decision p50 {cell.wall_p50_us:,.0f} µs wall / "
          f"{cell.cpu_p50_us:,.0f} µs CPU, p99 {cell.wall_p99_us:,.0f} µs; gRPC p50 "
          f"{cell.grpc_p50_us:,.0f} µs; match {cell.match_ratio_mean:.2f}; "
          f"load {cell.load_avg_1m:.1f}; {cell.seconds:.1f} s", file=sys.stderr, flush=True)


DECISION_SOURCES = tuple(f"router/kvroute_router/{part}" for part in (
    "director.py", "framework", "plugins", "kvevents", "grpcapi", "datastore"))


def source_state() -> dict[str, Any]:
    """The commit measured and whether the router's sources differed from it."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                                capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *DECISION_SOURCES],
                               cwd=root, check=True, capture_output=True, text=True,
                               timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "router_modified": None}
    return {"commit": commit, "router_modified": bool(dirty.strip())}


def machine() -> dict[str, Any]:
    return {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}


async def collect(config: SweepConfig, *, base: bool, base_iterations: int,
                  proxy_iterations: int, quiet: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    load_start = os.getloadavg()
    results: dict[str, Any] = {"config": asdict(config), "machine": machine(),
                               "source": source_state(), "load_avg_start": load_start}
    if base:
        import decision_path

        # its first two rows run the default policy without prefix-precise on purpose
        logging.getLogger("kvroute_router.framework.profile").setLevel(logging.ERROR)
        args = argparse.Namespace(iterations=base_iterations, proxy_iterations=proxy_iterations,
                                  rounds=config.rounds)
        if not quiet:
            print("64-endpoint decision path, gRPC and proxy rows (decision_path.py) …",
                  file=sys.stderr, flush=True)
        results["base"] = await decision_path.main_async(args)
        results["base_seconds"] = time.perf_counter() - started
    cells = await run_sweep(config, None if quiet else _progress_line)
    results["cells"] = [asdict(c) for c in cells]
    if not quiet:
        print("index memory …", file=sys.stderr, flush=True)
    results["memory"] = run_memory(config)
    results["load_avg_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - started
    return results


def _source_line(results: dict[str, Any]) -> str:
    source = results.get("source") or {}
    if not source.get("commit"):
        return "the code as checked out (commit unknown)"
    line = f"the router at commit `{source['commit']}`"
    if source.get("router_modified"):
        line += (" with uncommitted changes in the decision path's sources (director, "
                 "framework, plugins, kvevents, grpcapi, datastore)")
    return line


def render(results: dict[str, Any], command: str, png_name: str, json_name: str) -> str:
    lines: list[str] = []
    if "base" in results:
        import decision_path

        lines.append(decision_path.report(results["base"], command,
                                          script="bench/overhead_sweep.py").rstrip("\n"))
        lines.append("")
    else:
        lines += ["# Router overhead", "", f"Command: `{command}`", ""]
    lines += sweep_section(results, png_name, json_name)
    lines += memory_section(results)
    m = results["machine"]
    ls, le = results["load_avg_start"], results["load_avg_end"]
    lines += ["## Machine and run", "",
              f"{m['processor']}, {m['cpus']} CPU cores shared with other engineers' builds "
              f"and tests, Python {m['python']}; load average (1/5/15 min) {ls[0]:.1f}/"
              f"{ls[1]:.1f}/{ls[2]:.1f} at the start, {le[0]:.1f}/{le[1]:.1f}/{le[2]:.1f} at "
              f"the end; the whole command took {results['seconds']:.0f} s. Seeded "
              f"(`--seed {results['config']['seed']}`): the prompts, placements and load "
              "metrics repeat; the timings do not. The scheduler's per-endpoint loops "
              "(`router/kvroute_router/framework`, `plugins`) were being optimised concurrently "
              f"with this benchmark: these numbers are for {_source_line(results)}.", "",
              *reading(results)]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    parser.add_argument("--endpoints", type=ints, default=ENDPOINT_COUNTS,
                        help="comma-separated endpoint counts")
    parser.add_argument("--prompt-tokens", type=ints, default=PROMPT_TOKENS)
    parser.add_argument("--scorers", type=lambda t: tuple(t.split(",")), default=SCORERS)
    parser.add_argument("--iterations", type=int, default=SweepConfig.iterations,
                        help="timed decisions per round per cell")
    parser.add_argument("--grpc-iterations", type=int, default=SweepConfig.grpc_iterations)
    parser.add_argument("--rounds", type=int, default=SweepConfig.rounds)
    parser.add_argument("--warm-requests", type=int, default=SweepConfig.warm_requests)
    parser.add_argument("--fill-blocks", type=int, default=SweepConfig.fill_blocks,
                        help="blocks each endpoint holds in the precise index")
    parser.add_argument("--memory-blocks", type=ints, default=MEMORY_BLOCKS)
    parser.add_argument("--seed", type=int, default=SweepConfig.seed)
    parser.add_argument("--no-base", action="store_true",
                        help="skip the 64-endpoint decision/gRPC/proxy rows of decision_path.py")
    parser.add_argument("--base-iterations", type=int, default=2000)
    parser.add_argument("--proxy-iterations", type=int, default=1000)
    parser.add_argument("--write", default=None, help="write the Markdown report here; the JSON "
                        "and PNG go beside it as <stem>-sweep.json / <stem>-sweep.png")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--from-json", default=None, help="measure nothing: re-render --write's "
                        "Markdown and PNG from a JSON this script wrote")
    args = parser.parse_args(argv)
    unknown = set(args.scorers) - set(SCORERS)
    if unknown:
        parser.error(f"unknown scorers {sorted(unknown)}; choose from {SCORERS}")
    return args


def config_from(args: argparse.Namespace) -> SweepConfig:
    return SweepConfig(endpoints=args.endpoints, prompt_tokens=args.prompt_tokens,
                       scorers=args.scorers, iterations=args.iterations,
                       grpc_iterations=args.grpc_iterations, rounds=args.rounds,
                       warm_requests=args.warm_requests, fill_blocks=args.fill_blocks,
                       memory_blocks=args.memory_blocks, seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        config = config_from(args)
        results = asyncio.run(collect(config, base=not args.no_base,
                                      base_iterations=args.base_iterations,
                                      proxy_iterations=args.proxy_iterations, quiet=args.quiet))
        command = "python bench/overhead_sweep.py " + " ".join(
            sys.argv[1:] if argv is None else argv)
        results["command"] = command.strip()
    if args.write:
        md = Path(args.write)
        png = md.with_name(f"{md.stem}-sweep.png")
        js = md.with_name(f"{md.stem}-sweep.json")
        md.parent.mkdir(parents=True, exist_ok=True)
        if not args.from_json or Path(args.from_json).resolve() != js.resolve():
            js.write_text(json.dumps(results, indent=1) + "\n")
        plot([Cell(**c) for c in results["cells"]], png)
        md.write_text(render(results, results["command"], png.name, js.name))
        print(f"wrote {md}, {png}, {js}", file=sys.stderr)
    else:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
