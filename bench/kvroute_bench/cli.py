"""``kvroute bench`` itself: build the trace, start the engines, run the contenders, report.

Called by ``kvroute_cli.cmd_bench`` with the parsed arguments. Engines are started here (N
real vLLM-CPU engines, prefix caching and KV events on, ``VLLM_SERVER_DEV_MODE=1`` so their
caches can be reset between contenders) unless ``--attach FILE`` names engines already
running (a JSON list of ``{"url", "kv_events_endpoint", "replay_endpoint"}``).
"""

from __future__ import annotations

import argparse
import dataclasses
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


class EmulatedFleetProcess:
    """``python -m kvroute_emulator`` serving the engines of an emulated run."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        from kvroute_cli.testmodel import build_test_model

        folder = workdir / "engines"
        folder.mkdir(parents=True, exist_ok=True)
        self.model_dir = build_test_model(folder / "model")
        self.info_path = folder / "emulated.json"
        self.info_path.unlink(missing_ok=True)
        self.log_path = folder / "emulator.log"
        argv = [sys.executable, "-m", "kvroute_emulator", "--count", str(args.engines),
                "--profile", args.profile, "--time-scale", str(args.time_scale),
                "--model-dir", str(self.model_dir), "--endpoints-file", str(self.info_path)]
        if args.kv_blocks_set:
            argv += ["--kv-blocks", str(args.kv_blocks)]
        if args.block_size_set:
            argv += ["--block-size", str(args.block_size)]
        if args.max_context:
            argv += ["--max-model-len", str(args.max_context)]
        argv += ["--scheduling-policy", args.scheduling_policy,
                 "--kv-allocation", args.kv_allocation]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT / "emulator"), *filter(None, [env.get("PYTHONPATH")])])
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while not self.info_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit("the emulated fleet did not start:\n"
                                 + self.log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.2)
        self.info = self._describe()

    def _describe(self) -> dict[str, Any]:
        """The description the emulator prints once it listens (admin URL, profile, …)."""
        decoder = json.JSONDecoder()
        for _ in range(100):
            text = self.log_path.read_text(errors="replace")
            try:
                value, _ = decoder.raw_decode(text[text.find("{"):])
                if isinstance(value, dict):
                    return value
            except json.JSONDecodeError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"could not read the emulator's description from {self.log_path}")

    def status(self) -> list[dict[str, Any]]:
        import urllib.request

        with urllib.request.urlopen(f"{self.info['admin_url']}/engines", timeout=10) as r:
            data: list[dict[str, Any]] = json.loads(r.read())
            return data

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def local_engine_args(kv_blocks: int, scheduling_policy: str = "fcfs") -> list[str]:
    """``vllm serve`` flags of the real engines a benchmark starts (beyond the fleet's own)."""
    extra = ["--num-gpu-blocks-override", str(kv_blocks)] if kv_blocks else []
    if scheduling_policy != "fcfs":
        extra += ["--scheduling-policy", scheduling_policy]
    # vllm-router's kv_aware gets a text prompt's token ids from the engines' render route,
    # which vLLM 0.32 refuses (403) without this flag, and then matches no KV events at all
    # (docs/emulator.md, "Where it differs"). Its users enable it; the routes are unused by
    # every other contender.
    extra.append("--enable-scale-out")
    return extra


def _start_fleet(args: argparse.Namespace, workdir: Path) -> tuple[FleetInfo, Any]:
    if args.fleet == "emulated":
        emulated = EmulatedFleetProcess(args, workdir)
        engines = json.loads(emulated.info_path.read_text())
        fleet = FleetInfo([EngineInfo(name=e["name"], url=e["url"],
                                      kv_events_endpoint=e["kv_events_endpoint"],
                                      replay_endpoint=e["replay_endpoint"]) for e in engines],
                          emulated.info["model"], int(emulated.info["block_size"]),
                          emulated.model_dir, float(args.time_scale),
                          scheduling_policy=args.scheduling_policy)
        return fleet, emulated
    if args.attach:
        return _attached(args.attach, "kvroute-test-model", args.block_size), None
    from kvroute_cli.localengines import LocalEngineFleet

    handle = LocalEngineFleet(
        count=args.engines, workdir=workdir / "engines", block_size=args.block_size,
        max_model_len=4096,
        extra_args=local_engine_args(args.kv_blocks, args.scheduling_policy),
        env={"VLLM_SERVER_DEV_MODE": "1"})
    handle.start(progress=True)
    fleet = FleetInfo([EngineInfo(name=f"engine-{e.index}", url=e.url,
                                  kv_events_endpoint=e.kv_events_endpoint,
                                  replay_endpoint=e.replay_endpoint)
                       for e in handle.engines], handle.model_name, args.block_size,
                      workdir / "engines" / "model", scheduling_policy=args.scheduling_policy)
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
    args.kv_blocks_set = "--kv-blocks" in sys.argv
    args.block_size_set = "--block-size" in sys.argv
    if args.profile == "h100":
        args.profile = "h100-llama8b"
    if args.fleet == "emulated" and not args.time_scale:
        args.time_scale = float(args.engines) if args.profile == "h100-llama8b" else 1.0
    if args.trace:
        workloads = [f"trace:{args.trace}"] * len(workloads)
        sweeping = len(rates) > 1
        if sweeping:
            workloads = [workloads[0]] * len(rates)
    if args.sim and sweeping:
        console.print("--sim runs one rate per workload; sweep with separate --sim runs")
        return 2
    if args.sim:
        from kvroute_bench.sim.run import run_sim

        if not 1 <= args.sim_ensemble <= 64:
            console.print(f"--sim-ensemble {args.sim_ensemble}: runs per picker, 1 to 64")
            return 2
        args.workloads, args.rates = workloads, rates
        args.sim_pickers = _split(args.sim_pickers)
        return run_sim(args)
    single = len(set(workloads)) == 1
    names = _split(args.contenders) if args.contenders else default_contenders()
    contenders = CONTENDERS.select(names)
    bin_dirs = bench_bin_dirs(args.bench_venv)
    out_dir = Path(args.out)
    workdir = Path(args.workdir)
    fleet, handle = _start_fleet(args, workdir)
    try:
        traces = [_trace(args, w, rate, overrides if single else None, fleet, handle)
                  for w, rate in zip(workloads, rates, strict=True)]
    except BaseException:
        if handle is not None:
            handle.stop()
        raise
    return _run_all(args, console, traces, rates, workloads, sweeping, contenders, fleet,
                    handle, bin_dirs, out_dir, workdir)


def _fleet_kv_tokens(handle: Any, fleet: FleetInfo, args: argparse.Namespace) -> int:
    if isinstance(handle, EmulatedFleetProcess):
        return len(fleet.engines) * int(handle.info["kv_blocks"]) * fleet.block_size
    return len(fleet.engines) * int(args.kv_blocks) * fleet.block_size


def _max_context(args: argparse.Namespace, handle: Any) -> int:
    if args.max_context:
        return int(args.max_context)
    if isinstance(handle, EmulatedFleetProcess):
        return int(handle.info["max_model_len"])
    return 4096


def _trace(args: argparse.Namespace, workload: str, rate: float,
           overrides: dict[str, str] | None, fleet: FleetInfo, handle: Any) -> Trace:
    """The trace of one run: a trace file (its own arrival times, scaled), or a generated
    workload at ``rate``."""
    if workload.startswith("trace:"):
        from kvroute_bench.traces import TraceOptions, load

        # A rate sweep over a trace file scales its arrival times: rate 2 = twice as fast.
        trace = load(TraceOptions(Path(args.trace), args.trace_format,
                                  args.trace_time_scale / rate,
                                  _max_context(args, handle),
                                  args.requests + args.warmup, args.seed))
        return trace
    common: dict[str, Any] = {"requests": args.requests + args.warmup, "rate": rate,
                              "seed": args.seed}
    if workload == "precise-prefix":
        common["fleet_kv_tokens"] = _fleet_kv_tokens(handle, fleet, args)
        common["max_context"] = _max_context(args, handle)
    return generate(build_params(workload, overrides, **common))


def _run_all(args: argparse.Namespace, console: Console, traces: list[Trace],
             rates: list[float], workloads: list[str], sweeping: bool,
             contenders: list[Contender], fleet: FleetInfo, handle: Any,
             bin_dirs: list[Path], out_dir: Path, workdir: Path) -> int:
    redis_process = None
    try:
        if args.replica_sync:
            from kvroute_cli.localredis import start_redis

            # Shared infrastructure the kvroute replicas are pointed at, as the chart points
            # them at the operator's Redis; the peers have no such option.
            (workdir / "redis").mkdir(parents=True, exist_ok=True)
            redis_process, port = start_redis(workdir / "redis")
            fleet = dataclasses.replace(fleet,
                                        replica_sync_url=f"redis://127.0.0.1:{port}/0")
        swept: list[tuple[float, list[ContenderResult]]] = []
        swept_oracle: list[float] = []
        for trace, rate in zip(traces, rates, strict=True):
            stem = f"{args.name}-{trace.workload}" if args.name else trace.workload
            if sweeping:
                stem = f"{stem}-r{rate:g}"
            results, meta = _run_workload(args, console, trace, contenders, fleet, bin_dirs,
                                          workdir, handle)
            for path in report.write(results, meta, out_dir, stem, console):
                console.print(f"wrote {path}")
            swept.append((rate, results))
            swept_oracle.append(meta["oracle_hit_rate"])
        if sweeping:
            from kvroute_bench import sweep

            base = traces[0].workload
            stem = f"{args.name}-{base}" if args.name else base
            meta = {"workload": base, "rates": rates, "engines": len(fleet.engines),
                    "fleet": args.fleet, "profile": args.profile,
                    "time_scale": args.time_scale if args.fleet == "emulated" else 1.0,
                    "oracle_hit_rate": swept_oracle[0] if swept_oracle else None,
                    "requests": args.requests, "warmup": args.warmup, "seed": args.seed,
                    "machine": machine_description(),
                    "command": "kvroute " + " ".join(sys.argv[1:])}
            points = sweep.collect(swept, args.slo_ttft)
            for path in sweep.write(points, meta, out_dir, stem, args.slo_ttft, console):
                console.print(f"wrote {path}")
    finally:
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(timeout=10)
        if handle is not None:
            handle.stop()
    return 0


def replica_name(name: str, replicas: int, synced: bool = False) -> str:
    """How a contender run as ``replicas`` copies is named in the results (``synced``: the
    copies share their dispatches, ``--replica-sync``)."""
    if replicas == 1:
        return name
    return f"{name} x{replicas}" + (" synced" if synced else "")


def _oracle(trace: Trace, warmup: int, fleet: FleetInfo) -> float:
    from kvroute_bench.oracle import byte_tokens, oracle_hit_rate, served_model_tokenizer

    tokenize = (served_model_tokenizer(str(fleet.model_dir), fleet.model)
                if fleet.model_dir is not None else byte_tokens)
    return oracle_hit_rate(trace.requests, warmup, fleet.block_size, tokenize)


def _run_workload(args: argparse.Namespace, console: Console, trace: Trace,
                  contenders: list[Contender], fleet: FleetInfo, bin_dirs: list[Path],
                  workdir: Path, handle: Any = None
                  ) -> tuple[list[ContenderResult], dict[str, Any]]:
    description = (WORKLOADS[trace.workload].description if trace.workload in WORKLOADS
                   else f"replay of {trace.params.get('trace')} ({trace.params.get('format')})")
    console.print(f"[bold]{trace.workload}[/]: {description}")
    console.print(f"trace: {trace.summary()} (first {args.warmup} are warm-up, "
                  f"{args.warmup_mode})")
    meta: dict[str, Any] = {
        "workload": trace.workload, "params": trace.params, "trace": trace.summary(),
        "warmup": args.warmup, "repeats": args.repeats, "engines": len(fleet.engines),
        "kv_blocks": (handle.info["kv_blocks"] if isinstance(handle, EmulatedFleetProcess)
                      else args.kv_blocks),
        "block_size": fleet.block_size, "machine": machine_description(),
        "fleet": args.fleet, "profile": args.profile if args.fleet == "emulated" else None,
        "time_scale": args.time_scale if args.fleet == "emulated" else 1.0,
        "oracle_hit_rate": round(_oracle(trace, args.warmup, fleet), 4),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "kvroute " + " ".join(sys.argv[1:]),
    }
    started = time.monotonic()
    plan = RunPlan(trace=trace, warmup=args.warmup, contenders=contenders, workdir=workdir,
                   bin_dirs=bin_dirs, request_timeout_s=args.request_timeout,
                   time_scale=args.time_scale if args.fleet == "emulated" else 1.0,
                   replicas=args.replicas, continuous_warmup=args.warmup_mode == "continuous")
    meta["warmup_mode"] = args.warmup_mode
    meta["replicas"] = args.replicas
    meta["replica_sync"] = bool(args.replica_sync)
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
    if args.replicas > 1:
        for contender, result in zip(contenders, results, strict=True):
            if contender.command is not None:
                result.name = replica_name(contender.name, args.replicas,
                                           args.replica_sync and contender.family == "kvroute")
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
    if isinstance(handle, EmulatedFleetProcess):
        # How far the emulator fell behind real time (emulated s, summed over the run): large
        # values mean the machine, not the engine model, shaped the latencies.
        status = handle.status()
        meta["emulator_lag_s_max_engine"] = max(e["lag_s"] for e in status)
        meta["emulator_steps"] = sum(e["steps"] for e in status)
    return results, meta
