"""``kvroute bench --sim``: a workload through simulated pods, once per picker, as a table.

Pickers: ``round-robin`` (the baseline) and kvroute's own scheduler profiles
(``kvroute-approx``, ``kvroute-approx-load``, ``kvroute-precise-load``: the last with the
KV-event index fed by the simulated engines), built by :class:`RouterPicker` from the same
scorer lists the real-engine contenders use. A suffix ``@MS`` on a kvroute picker's name
(``kvroute-approx-load@100``) makes its metrics a scrape every MS milliseconds of simulated
time (the router's ``--scrape-interval-ms``, default 100) instead of the engines' state at the
instant of each decision. Profiles: ``cpu`` (the local test engines) and ``h100`` (an 8B model
on one H100, from the shared calibration file).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvroute_emulator.model.profile import (
    CostProfile,
    cpu_test_engine,
    h100_llama8b,
    h100_llama8b_builtin,
)
from rich.console import Console
from rich.table import Table

from kvroute_bench.sim.fleet import Picker, RoundRobinPicker, simulate, to_sim_requests
from kvroute_bench.workloads import build_params, generate

CALIBRATION = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "calibration" \
    / "h100-llama8b-shape.json"

SIM_PICKERS: dict[str, list[dict[str, Any]] | None] = {
    "round-robin": None,
    "kvroute-approx": [{"type": "prefix-approx", "weight": 1.0}],
    "kvroute-approx-load": [{"type": "prefix-approx", "weight": 3.0},
                            {"type": "queue-depth", "weight": 1.0},
                            {"type": "kv-utilization", "weight": 1.0}],
    "kvroute-precise-load": [{"type": "prefix-precise", "weight": 3.0},
                             {"type": "queue-depth", "weight": 1.0},
                             {"type": "kv-utilization", "weight": 1.0}],
}


def split_picker_name(name: str) -> tuple[str, float]:
    """``kvroute-approx-load@100`` → (``kvroute-approx-load``, 0.1 s scrape interval)."""
    base, _, interval = name.partition("@")
    if not interval:
        return base, 0.0
    try:
        ms = float(interval)
    except ValueError:
        raise SystemExit(f"picker {name!r}: the part after @ is a scrape interval in "
                         f"milliseconds") from None
    if ms < 0 or base == "round-robin":
        raise SystemExit(f"picker {name!r}: a scrape interval needs a kvroute picker and "
                         f"a non-negative number of milliseconds")
    return base, ms / 1000.0


def needs_block_hashes(name: str) -> bool:
    """Whether the trace must carry the simulator's own block hashes (every picker except
    the KV-event one, whose engines get the router's hashes at its decisions)."""
    scorers = SIM_PICKERS.get(split_picker_name(split_replicas(name)[0])[0]) or []
    return not any(s["type"] == "prefix-precise" for s in scorers)


def profile_named(name: str, kv_blocks: int) -> CostProfile:
    if name == "cpu":
        return cpu_test_engine(kv_blocks or 384)
    if name in ("h100", "h100-llama8b"):
        if not CALIBRATION.exists():  # the same numbers, built in
            return h100_llama8b_builtin(kv_blocks or 30_000)
        return h100_llama8b(CALIBRATION, kv_blocks or 30_000)
    raise SystemExit(f"unknown profile {name!r}; valid: cpu, h100-llama8b")


def split_replicas(name: str) -> tuple[str, int, str]:
    """``kvroute-precise-load@1600/x3`` → (``kvroute-precise-load@1600``, 3, ""): three
    independent replicas behind per-request round-robin. ``/x3shared`` (``"both"``),
    ``/x3pending``, ``/x3counts``: replicas that learn of each other's dispatches at once
    (see ``ReplicatedPicker``)."""
    base, _, spec = name.partition("/")
    if not spec:
        return base, 1, ""
    count = spec.removeprefix("x")
    shared = ""
    for suffix, mode in (("shared", "both"), ("pending", "pending"), ("counts", "counts")):
        if count.endswith(suffix):
            count, shared = count.removesuffix(suffix), mode
            break
    if (not spec.startswith("x") or not count.isdigit() or int(count) < 1
            or base.startswith("round-robin")):
        raise SystemExit(f"picker {name!r}: the part after / is xN, xNshared, xNpending or "
                         f"xNcounts (N replicas of a kvroute picker)")
    return base, int(count), shared


def make_picker(name: str, block_size: int) -> Picker:
    name, replicas, shared = split_replicas(name)
    if replicas > 1 or shared:
        from kvroute_bench.sim.router_picker import ReplicatedPicker, RouterPicker

        def one() -> RouterPicker:
            picker = make_picker(name, block_size)
            assert isinstance(picker, RouterPicker)
            return picker

        return ReplicatedPicker(one, replicas, shared)
    base, scrape_interval_s = split_picker_name(name)
    if base not in SIM_PICKERS:
        raise SystemExit(f"unknown simulator picker {name!r}; valid: {', '.join(SIM_PICKERS)} "
                         f"(kvroute ones optionally with @MS, a scrape interval)")
    scorers = SIM_PICKERS[base]
    if scorers is None:
        return RoundRobinPicker()
    from kvroute_bench.sim.router_picker import RouterPicker

    precise = any(s["type"] == "prefix-precise" for s in scorers)
    return RouterPicker({"scorers": scorers}, block_size=block_size,
                        scrape_interval_s=scrape_interval_s, precise=precise)


def set_pending_ttl(picker: Picker, seconds: float) -> None:
    """How long a kvroute picker's pending-block marks last (simulated seconds; the router's
    ``DEFAULT_PENDING_TTL_S`` otherwise): on an emulated fleet they last 5 s of *wall* time,
    i.e. 5 / time-scale of engine time, which this reproduces."""
    from kvroute_bench.sim.router_picker import ReplicatedPicker, RouterPicker

    routers = (picker.replicas if isinstance(picker, ReplicatedPicker)
               else [picker] if isinstance(picker, RouterPicker) else [])
    for router in routers:
        if router.pool_events is not None:
            router.pool_events.index.pending_ttl = seconds


def run_sim(args: argparse.Namespace) -> int:
    console = Console(width=150)
    profile = profile_named(args.profile, args.kv_blocks if args.kv_blocks_set else 0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for workload, rate in zip(args.workloads, args.rates, strict=True):
        overrides = dict(item.split("=", 1) for item in args.set or [])
        trace = generate(build_params(workload, overrides if len(args.workloads) == 1 else None,
                                      requests=args.requests, rate=rate, seed=args.seed))
        table = Table(title=f"simulated {workload}: {args.pods} pods, profile {profile.name}, "
                            f"{args.requests} requests at {rate}/s")
        for column in ("picker", "TTFT p50 ms", "p90", "p99", "e2e p50 ms", "p99",
                       "out tok/s", "prefix hit", "unfinished", "wall s"):
            table.add_column(column, justify="left" if column == "picker" else "right")
        rows: list[dict[str, Any]] = []
        for name in args.sim_pickers:
            started = time.monotonic()
            picker = make_picker(name, profile.block_size)
            if args.sim_pending_ttl is not None:
                set_pending_ttl(picker, args.sim_pending_ttl)
            result = simulate(to_sim_requests(trace.requests, profile.block_size,
                                              keep_text=name != "round-robin",
                                              hash_blocks=needs_block_hashes(name)),
                              args.pods, profile, picker)
            wall = time.monotonic() - started
            rows.append({"picker": name, "wall_s": round(wall, 2), **asdict(result)})
            table.add_row(name, f"{result.ttft_p50_s * 1000:.0f}",
                          f"{result.ttft_p90_s * 1000:.0f}", f"{result.ttft_p99_s * 1000:.0f}",
                          f"{result.e2e_p50_s * 1000:.0f}", f"{result.e2e_p99_s * 1000:.0f}",
                          f"{result.output_tokens_per_s:.1f}", f"{result.prefix_hit_rate:.1%}",
                          str(result.unfinished), f"{wall:.1f}")
        console.print(table)
        stem = f"{args.name}-sim-{workload}" if args.name else f"sim-{workload}"
        path = out_dir / f"{stem}.json"
        path.write_text(json.dumps({"workload": workload, "pods": args.pods, "rate": rate,
                                    "profile": asdict(profile), "params": trace.params,
                                    "results": rows}, indent=1, default=str) + "\n")
        console.print(f"wrote {path}")
    return 0
