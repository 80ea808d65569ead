"""``kvroute bench`` itself: build the trace, start the engines, run the contenders, report.

Called by ``kvroute_cli.cmd_bench`` with the parsed arguments. Engines are started here (N
real vLLM-CPU engines, prefix caching and KV events on, ``VLLM_SERVER_DEV_MODE=1`` so their
caches can be reset between contenders) unless ``--attach FILE`` names engines already
running (a JSON list of ``{"url", "kv_events_endpoint", "replay_endpoint"}``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvroute_bench import report
from kvroute_bench.contenders import (
    CONTENDERS,
    Contender,
    ContenderStartError,
    EngineInfo,
    FleetInfo,
    available,
    default_contenders,
)
from kvroute_bench.harness import (
    ContenderResult,
    Measurement,
    RunPlan,
    aggregate,
    run_contender,
    skipped_result,
)
from kvroute_bench.workloads import WORKLOADS, Trace, build_params, generate

REPO_ROOT = Path(__file__).resolve().parents[2]


def bench_bin_dirs(explicit: str | None) -> list[Path]:
    """Where the peer routers' executables are: --bench-venv, $KVROUTE_BENCH_VENV, kvenv.sh."""
    venv = explicit or os.environ.get("KVROUTE_BENCH_VENV")
    if not venv:
        script = REPO_ROOT / "scripts" / "kvenv.sh"
        try:
            venv = subprocess.run([str(script), "bench"], check=True, capture_output=True,
                                  text=True, timeout=1800).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return []
    return [Path(venv) / "bin"]


def machine_description() -> str:
    cores = os.cpu_count() or 0
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cores} cores ({cpu}), load average {load:.1f} at start"


def _attached(path: str, model: str, block_size: int) -> FleetInfo:
    entries = json.loads(Path(path).read_text())
    model_dir = next((e["model_dir"] for e in entries if e.get("model_dir")), None)
    return FleetInfo([EngineInfo(name=f"engine-{i}", url=e["url"],
                                 kv_events_endpoint=e["kv_events_endpoint"],
                                 replay_endpoint=e["replay_endpoint"])
                      for i, e in enumerate(entries)], model, block_size,
                     Path(model_dir) if model_dir else None)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _start_fleet(args: argparse.Namespace, workdir: Path) -> tuple[FleetInfo, Any]:
    if args.attach:
        return _attached(args.attach, "kvroute-test-model", args.block_size), None
    from kvroute_cli.localengines import LocalEngineFleet

    extra = ["--num-gpu-blocks-override", str(args.kv_blocks)] if args.kv_blocks else []
    handle = LocalEngineFleet(
        count=args.engines, workdir=workdir / "engines", block_size=args.block_size,
        max_model_len=4096, extra_args=extra, env={"VLLM_SERVER_DEV_MODE": "1"})
    handle.start(progress=True)
    fleet = FleetInfo([EngineInfo(name=f"engine-{e.index}", url=e.url,
                                  kv_events_endpoint=e.kv_events_endpoint,
                                  replay_endpoint=e.replay_endpoint)
                       for e in handle.engines], handle.model_name, args.block_size,
                      workdir / "engines" / "model")
    return fleet, handle


def run(args: argparse.Namespace) -> int:
    """Every workload named in ``--workload`` through every contender, on one fleet."""
    console = Console() if sys.stdout.isatty() else Console(width=150)
    overrides = dict(item.split("=", 1) for item in args.set or [])
    workloads = _split(args.workload)
    rates = [float(r) for r in _split(args.rate)]
    # One workload with several rates is a rate sweep: the same seeded prompts at each rate.
    sweeping = len(workloads) == 1 and len(rates) > 1
    if sweeping:
        workloads = workloads * len(rates)
    if len(rates) == 1:
        rates *= len(workloads)
    if len(rates) != len(workloads):
        console.print(f"--rate gives {len(rates)} rates for {len(workloads)} workloads "
                      "(give one rate, one per workload, or several for a single workload "
                      "to sweep)")
        return 2
    if args.sim and sweeping:
        console.print("--sim runs one rate per workload; sweep with separate --sim runs")
        return 2
    if args.sim:
        from kvroute_bench.sim.run import run_sim

        args.workloads, args.rates = workloads, rates
        args.sim_pickers = _split(args.sim_pickers)
        args.kv_blocks_set = "--kv-blocks" in sys.argv
        return run_sim(args)
    single = len(set(workloads)) == 1
    traces = [generate(build_params(w, overrides if single else None,
                                    requests=args.requests + args.warmup, rate=rate,
                                    seed=args.seed))
              for w, rate in zip(workloads, rates, strict=True)]
    names = _split(args.contenders) if args.contenders else default_contenders()
    contenders = CONTENDERS.select(names)
    bin_dirs = bench_bin_dirs(args.bench_venv)
    out_dir = Path(args.out)
    workdir = Path(args.workdir)
    fleet, handle = _start_fleet(args, workdir)
    try:
        swept: list[tuple[float, list[ContenderResult]]] = []
        for trace, rate in zip(traces, rates, strict=True):
            stem = f"{args.name}-{trace.workload}" if args.name else trace.workload
            if sweeping:
                stem = f"{stem}-r{rate:g}"
            results, meta = _run_workload(args, console, trace, contenders, fleet, bin_dirs,
                                          workdir)
            for path in report.write(results, meta, out_dir, stem, console):
                console.print(f"wrote {path}")
            swept.append((rate, results))
        if sweeping:
            from kvroute_bench import sweep

            stem = f"{args.name}-{workloads[0]}" if args.name else workloads[0]
            meta = {"workload": workloads[0], "rates": rates, "engines": len(fleet.engines),
                    "requests": args.requests, "warmup": args.warmup, "seed": args.seed,
                    "machine": machine_description(),
                    "command": "kvroute " + " ".join(sys.argv[1:])}
            points = sweep.collect(swept, args.slo_ttft)
            for path in sweep.write(points, meta, out_dir, stem, args.slo_ttft, console):
                console.print(f"wrote {path}")
    finally:
        if handle is not None:
            handle.stop()
    return 0


def _run_workload(args: argparse.Namespace, console: Console, trace: Trace,
                  contenders: list[Contender], fleet: FleetInfo, bin_dirs: list[Path],
                  workdir: Path) -> tuple[list[ContenderResult], dict[str, Any]]:
    console.print(f"[bold]{trace.workload}[/]: {WORKLOADS[trace.workload].description}")
    console.print(f"trace: {trace.summary()} (first {args.warmup} are warm-up)")
    meta: dict[str, Any] = {
        "workload": trace.workload, "params": trace.params, "trace": trace.summary(),
        "warmup": args.warmup, "repeats": args.repeats, "engines": len(fleet.engines),
        "kv_blocks": args.kv_blocks,
        "block_size": args.block_size, "machine": machine_description(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "kvroute " + " ".join(sys.argv[1:]),
    }
    started = time.monotonic()
    plan = RunPlan(trace=trace, warmup=args.warmup, contenders=contenders, workdir=workdir,
                   bin_dirs=bin_dirs, request_timeout_s=args.request_timeout)
    rounds: dict[str, list[Measurement]] = {c.name: [] for c in contenders}
    failed: dict[str, str] = {}
    for c in contenders:
        if not available(c, bin_dirs):
            failed[c.name] = f"{c.needs} not installed"
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        for round_ in range(args.repeats):
            # Alternate the order so slow drifts of a shared machine's background load do not
            # always favour the same contenders.
            order = contenders if round_ % 2 == 0 else list(reversed(contenders))
            for contender in order:
                if contender.name in failed:
                    continue
                label = f"{contender.name} (round {round_ + 1}/{args.repeats})"
                task = bar.add_task(f"{label}: starting", total=len(trace.requests))

                def progress(phase: str, done: int, total: int, task: Any = task,
                             name: str = label) -> None:
                    if phase == "warm-up":
                        bar.update(task, completed=done, description=f"{name}: {phase}")
                    elif phase == "measured":
                        bar.update(task, completed=args.warmup + done,
                                   description=f"{name}: {phase}")
                    else:
                        bar.update(task, description=f"{name}: {phase}")

                try:
                    rounds[contender.name].append(run_contender(plan, contender, fleet,
                                                                progress))
                except ContenderStartError as exc:
                    console.print(f"[red]{contender.name} did not start[/]: {exc}")
                    failed[contender.name] = str(exc).splitlines()[0]
                bar.update(task, description=f"{label}: done")
    results: list[ContenderResult] = [
        aggregate(c, rounds[c.name]) if rounds[c.name] else skipped_result(c, failed[c.name])
        for c in contenders]
    if args.cross_check:
        from kvroute_bench import crosscheck

        console.print("cross-check: replaying the measured trace with aiperf (direct-rr)")
        check = crosscheck.run(fleet, trace.requests[: args.warmup],
                               trace.requests[args.warmup:], workdir / "aiperf", bin_dirs,
                               timeout_s=trace.requests[-1].arrival_s + 600)
        ours = next((r for r in results if r.name == "direct-rr" and not r.skipped), None)
        if ours is not None:
            check["ours"] = {"ttft_p50_s": ours.ttft_p50_s, "ttft_p90_s": ours.ttft_p90_s,
                             "ttft_p99_s": ours.ttft_p99_s, "e2e_p50_s": ours.e2e_p50_s,
                             "e2e_p99_s": ours.e2e_p99_s}
        meta["cross_check_aiperf"] = check
        console.print(f"cross-check: {check}")
    meta["duration_s"] = round(time.monotonic() - started, 1)
    return results, meta
