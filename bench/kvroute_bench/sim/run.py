"""``kvroute bench --sim``: a workload through simulated pods, once per picker, as a table.

Pickers: ``round-robin`` (the baseline) and kvroute's own scheduler profiles
(``kvroute-approx``, ``kvroute-approx-load``), built by :class:`RouterPicker` from the same
scorer lists the real-engine contenders use. Profiles: ``cpu`` (the local test engines) and
``h100`` (an 8B model on one H100, from the shared calibration file).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvroute_bench.sim.fleet import Picker, RoundRobinPicker, simulate, to_sim_requests
from kvroute_bench.sim.profile import CostProfile, cpu_test_engine, h100_llama8b
from kvroute_bench.workloads import build_params, generate

CALIBRATION = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "calibration" \
    / "h100-llama8b-shape.json"

SIM_PICKERS: dict[str, list[dict[str, Any]] | None] = {
    "round-robin": None,
    "kvroute-approx": [{"type": "prefix-approx", "weight": 1.0}],
    "kvroute-approx-load": [{"type": "prefix-approx", "weight": 3.0},
                            {"type": "queue-depth", "weight": 1.0},
                            {"type": "kv-utilization", "weight": 1.0}],
}


def profile_named(name: str, kv_blocks: int) -> CostProfile:
    if name == "cpu":
        return cpu_test_engine(kv_blocks or 384)
    if name == "h100":
        if not CALIBRATION.exists():
            raise SystemExit(f"the h100 profile needs {CALIBRATION}")
        return h100_llama8b(CALIBRATION, kv_blocks or 30_000)
    raise SystemExit(f"unknown profile {name!r}; valid: cpu, h100")


def make_picker(name: str, block_size: int) -> Picker:
    if name not in SIM_PICKERS:
        raise SystemExit(f"unknown simulator picker {name!r}; valid: {', '.join(SIM_PICKERS)}")
    scorers = SIM_PICKERS[name]
    if scorers is None:
        return RoundRobinPicker()
    from kvroute_bench.sim.router_picker import RouterPicker

    return RouterPicker({"scorers": scorers}, block_size=block_size)


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
            result = simulate(to_sim_requests(trace.requests, profile.block_size,
                                              keep_text=name != "round-robin"),
                              args.pods, profile, make_picker(name, profile.block_size))
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
