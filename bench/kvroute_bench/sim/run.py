"""``kvroute bench --sim``: a workload through simulated pods, once per picker, as a table.

Pickers: ``round-robin`` (the baseline), ``group-affinity`` (a reference told each request's
tenant: every tenant on one engine, tenants spread evenly, blind to load),
``kvroute-approx-load`` (simulator only) and every
kvroute contender of the real-engine bench (``kvroute-precise-cost``, the default;
``kvroute-precise-load``; their A/B variants: the same scorers and policy extras, from
:data:`~kvroute_bench.contenders.KVROUTE_VARIANTS`), built by :class:`RouterPicker`; the
``prefix-precise`` ones read a KV-event index fed by the simulated engines. Beside each hit
rate: the oracle's, and why the rest was recomputed (``SimResult.recomputed``: evicted from the
engine, held only elsewhere, or still being computed), and where each request went against
what the engines held at that moment (``SimResult.placement``: the share sent away from the
engine holding most of its prompt, and the share whose prompt no engine held). A suffix
``@MS`` on a kvroute picker's name (``kvroute-approx-load@100``) makes its metrics a scrape
every MS milliseconds of simulated time (the router's ``--scrape-interval-ms``, default 100)
instead of the engines' state at the instant of each decision. Profiles: ``cpu`` (the local
test engines) and ``h100`` (an 8B model on one H100, from the shared calibration file).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvroute_api.inference_pool import KVEventsSpec
from kvroute_emulator.model.profile import (
    CostProfile,
    cpu_test_engine,
    h100_llama8b,
    h100_llama8b_builtin,
)
from rich.console import Console
from rich.table import Table

from kvroute_bench.contenders import KVROUTE_VARIANTS
from kvroute_bench.oracle import oracle_hit_rate
from kvroute_bench.sim.fleet import (
    RECOMPUTE_CAUSES,
    TTFT_CLASSES,
    GroupAffinityPicker,
    Picker,
    RoundRobinPicker,
    simulate,
    to_sim_requests,
    ttft_by_class,
)
from kvroute_bench.workloads import Trace, TraceRequest, build_params, generate

CALIBRATION = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "calibration" \
    / "h100-llama8b-shape.json"

SIM_ONLY: dict[str, dict[str, Any] | None] = {
    "round-robin": None,
    "group-affinity": None,  # a reference told each request's tenant (GroupAffinityPicker)
    "kvroute-approx-load": {"scoring": {"scorers": [{"type": "prefix-approx", "weight": 3.0},
                                                    {"type": "queue-depth", "weight": 1.0},
                                                    {"type": "kv-utilization", "weight": 1.0}]}},
}
SIM_PICKERS: dict[str, dict[str, Any] | None] = {
    **SIM_ONLY,
    # Every kvroute contender of the real-engine bench, with its scoring and policy extras.
    **{f"kvroute-{name}": {"scoring": {"scorers": variant.scoring,
                                       **variant.policy.get("scoring", {})},
                           "admission": variant.policy.get("admission"),
                           # the pool's engine.kvEvents, checked (and defaulted) by the API
                           "eviction_forecast": KVEventsSpec.model_validate(
                               variant.kv_events).eviction_forecast}
       for name, variant in KVROUTE_VARIANTS.items()},
}
"""Picker name -> ``RouterPicker`` arguments (``None``: one of the :data:`REFERENCES`)."""
REFERENCES = ("round-robin", "group-affinity")
"""The simulator's own pickers: they read no prompt text."""


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
    if ms < 0 or base in REFERENCES:
        raise SystemExit(f"picker {name!r}: a scrape interval needs a kvroute picker and "
                         f"a non-negative number of milliseconds")
    return base, ms / 1000.0


def needs_block_hashes(name: str) -> bool:
    """Whether the trace must carry the simulator's own block hashes (every picker except
    the KV-event one, whose engines get the router's hashes at its decisions)."""
    base = split_replicas(split_sync_delay(name)[0])[0]
    picker = SIM_PICKERS.get(split_picker_name(base)[0]) or {}
    scorers = picker.get("scoring", {}).get("scorers", [])
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
    independent replicas behind per-request round-robin. ``/x3shared`` (``"all"``: what
    replica sync shares), ``/x3both`` (round 18's replica sync: pending marks, in-flight
    prefixes and counts), ``/x3pending``, ``/x3counts``: replicas that learn of each other's
    dispatches at once (see ``ReplicatedPicker``)."""
    base, _, spec = name.partition("/")
    if not spec:
        return base, 1, ""
    count = spec.removeprefix("x")
    shared = ""
    for suffix, mode in (("shared", "all"), ("both", "both"), ("pending", "pending"),
                         ("counts", "counts")):
        if count.endswith(suffix):
            count, shared = count.removesuffix(suffix), mode
            break
    if (not spec.startswith("x") or not count.isdigit() or int(count) < 1
            or base.startswith(REFERENCES)):
        raise SystemExit(f"picker {name!r}: the part after / is xN, xNshared, xNboth, "
                         f"xNpending or xNcounts (N replicas of a kvroute picker)")
    return base, int(count), shared


def split_sync_delay(name: str) -> tuple[str, float | None]:
    """``kvroute-precise-cost/x3shared~30`` → (``kvroute-precise-cost/x3shared``, 0.03): the
    replicas run as router processes do and learn of each other's dispatches 30 ms
    (simulated) after them; without ``~MS``, None (``ReplicatedPicker.delay_s``)."""
    base, tilde, delay = name.partition("~")
    if not tilde:
        return name, None
    if "/x" not in base or not delay.isdigit():
        raise SystemExit(f"picker {name!r}: ~MS (a replica-sync delay in ms) follows /xN…, "
                         f"e.g. kvroute-precise-cost/x3shared~30")
    return base, int(delay) / 1000


def make_picker(name: str, block_size: int,
                trace: Sequence[TraceRequest] = (), scheduling_policy: str = "fcfs",
                seed: int = 0) -> Picker:
    """The picker ``name`` (``trace``: the requests, for ``group-affinity``'s groups;
    ``scheduling_policy``: the engines', a kvroute picker sets priorities under
    ``priority``; ``seed``: a kvroute picker's tie-break stream — replica ``i`` of a
    replicated picker of N draws from stream ``seed * N + i``)."""
    name, delay_s = split_sync_delay(name)
    name, replicas, shared = split_replicas(name)
    if replicas > 1 or shared:
        from kvroute_bench.sim.router_picker import ReplicatedPicker, RouterPicker

        def one(index: int) -> RouterPicker:
            picker = make_picker(name, block_size, scheduling_policy=scheduling_policy,
                                 seed=seed * replicas + index)
            assert isinstance(picker, RouterPicker)
            return picker

        return ReplicatedPicker(one, replicas, shared, delay_s)
    base, scrape_interval_s = split_picker_name(name)
    if base not in SIM_PICKERS:
        raise SystemExit(f"unknown simulator picker {name!r}; valid: {', '.join(SIM_PICKERS)} "
                         f"(kvroute ones optionally with @MS, a scrape interval)")
    spec = SIM_PICKERS[base]
    if spec is None:
        return (GroupAffinityPicker({r.index: r.group for r in trace})
                if base == "group-affinity" else RoundRobinPicker())
    from kvroute_bench.sim.router_picker import RouterPicker

    return RouterPicker(spec["scoring"], block_size=block_size,
                        scrape_interval_s=scrape_interval_s,
                        precise=not needs_block_hashes(base), admission=spec["admission"],
                        engine_priority=scheduling_policy == "priority", seed=seed,
                        eviction_forecast=spec.get("eviction_forecast",
                                                   KVEventsSpec().eviction_forecast))


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


def sim_warmup(args: argparse.Namespace) -> int:
    """The simulator's warm-up: with ``--warmup-mode continuous``, ``--warmup`` requests run
    first and are left out of the results, as on a fleet (a simulated engine never drains, so
    only the continuous mode has a simulated counterpart); otherwise none: every request
    counts, as in the oracle it is compared with."""
    return args.warmup if args.warmup_mode == "continuous" else 0


def sim_trace(args: argparse.Namespace, path: Path, rate: float) -> Trace:
    """A trace file's first ``--requests`` requests (plus the :func:`sim_warmup`), as
    ``kvroute bench --trace`` replays them on a fleet (``--rate`` scales its arrival times:
    2 = twice as fast)."""
    from kvroute_bench.traces import TraceFormatError, TraceOptions, load

    try:
        return load(TraceOptions(path, args.trace_format, args.trace_time_scale / rate,
                                 args.max_context or 32768, args.requests + sim_warmup(args),
                                 args.seed))
    except (OSError, TraceFormatError) as exc:
        raise SystemExit(f"--trace {path}: {exc}") from None


ENSEMBLE_KEYS = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "prefix_hit_rate",
                 "output_tokens_per_s", "goodput_per_s")
"""What the JSON keeps of each run of an ensemble (``--sim-ensemble``), beside its mean."""


def ensemble_mean(members: Sequence[Any]) -> Any:
    """The mean of an ensemble's results, field by field (dicts by key, lists element by
    element; None where any run has None). One run is itself."""
    first = members[0]
    if len(members) == 1:
        return first
    if isinstance(first, dict):
        return {key: ensemble_mean([m[key] for m in members]) for key in first}
    if isinstance(first, list):
        return [ensemble_mean(column) for column in zip(*members, strict=True)]
    if any(m is None for m in members):
        return None
    return sum(members) / len(members)


def class_table(classes: Sequence[tuple[str, dict[str, Any]]]) -> Table:
    """TTFT by request class per picker (:func:`~kvroute_bench.sim.fleet.ttft_by_class`):
    which requests make the tail."""
    table = Table(title="TTFT by request class (first of its group / arrived while the first "
                        "was computing / later); tail = share of the requests above p90")
    for column in ("picker", "class", "requests", "TTFT p50 ms", "p90", "queued p50 ms",
                   "tail"):
        table.add_column(column, justify="left" if column in ("picker", "class") else "right")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    for name, by_class in classes:
        for cls in TTFT_CLASSES:
            row = by_class[cls]
            table.add_row(name, cls, str(row["requests"]), ms(row["ttft_p50_s"]),
                          ms(row["ttft_p90_s"]), ms(row["queue_p50_s"]),
                          f"{row['tail_share']:.0%}")
    return table


def run_sim(args: argparse.Namespace) -> int:
    console = Console(width=150)
    profile = profile_named(args.profile, args.kv_blocks if args.kv_blocks_set else 0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    warmup = sim_warmup(args)
    for workload, rate in zip(args.workloads, args.rates, strict=True):
        overrides = dict(item.split("=", 1) for item in args.set or [])
        sizing: dict[str, Any] = {}
        if workload == "precise-prefix":  # tenants sized to the simulated fleet's KV
            sizing = {"fleet_kv_tokens": args.pods * profile.kv_blocks * profile.block_size,
                      "max_context": args.max_context or 8192}
        if workload.startswith("trace:"):
            trace = sim_trace(args, Path(workload.removeprefix("trace:")), rate)
        else:
            trace = generate(build_params(workload, overrides if len(args.workloads) == 1
                                          else None, requests=args.requests + warmup,
                                          rate=rate,
                                          seed=args.seed, **sizing))
        # The oracle over the counted requests (after the warm-up's, if any).
        oracle = oracle_hit_rate(trace.requests, warmup, profile.block_size)
        label = trace.workload if workload.startswith("trace:") else workload
        table = Table(title=f"simulated {label}: {args.pods} pods, profile {profile.name}, "
                            f"{args.requests} requests at {rate}/s"
                            + (f" after {warmup} continuous warm-up" if warmup else "")
                            + f", engines {args.scheduling_policy}"
                            + f", KV {args.kv_allocation}")
        if args.sim_ensemble > 1:
            table.title = f"{table.title}; the mean of {args.sim_ensemble} runs a picker"
        for column in ("picker", "TTFT p50 ms", "p90",
                       *(["p90 min-max"] if args.sim_ensemble > 1 else []), "p99",
                       "e2e p50 ms", "p99",
                       "out tok/s", f"goodput /s (≤{args.slo_ttft:g} s)",
                       "prefix hit", "oracle", *(f"re: {c}" for c in
                                                                RECOMPUTE_CAUSES),
                       "left holder", "held nowhere", "preempted", "unfinished", "wall s"):
            table.add_column(column, justify="left" if column == "picker" else "right")
        rows: list[dict[str, Any]] = []
        classes: list[tuple[str, dict[str, Any]]] = []
        for name in args.sim_pickers:
            started = time.monotonic()
            members = []
            for member in range(1 if name in REFERENCES else args.sim_ensemble):
                picker = make_picker(name, profile.block_size, trace.requests,
                                     args.scheduling_policy, seed=member)
                if args.sim_pending_ttl is not None:
                    set_pending_ttl(picker, args.sim_pending_ttl)
                sim_requests = to_sim_requests(trace.requests, profile.block_size,
                                               keep_text=name not in REFERENCES,
                                               hash_blocks=needs_block_hashes(name))
                result = asdict(simulate(
                    sim_requests, args.pods, profile, picker,
                    scheduling_policy=args.scheduling_policy,
                    kv_allocation=args.kv_allocation, warmup=warmup,
                    scrape_phase=member / args.sim_ensemble, slo_ttft_s=args.slo_ttft))
                result["ttft_by_class"] = ttft_by_class(
                    sim_requests, [r.group for r in trace.requests], warmup)
                members.append(result)
                if args.sim_ensemble > 1:  # progress: a run takes seconds to a minute
                    console.print(f"[dim]{name}: run {member + 1} of {args.sim_ensemble}, "
                                  f"TTFT p90 {result['ttft_p90_s'] * 1000:.0f} ms[/dim]")
            wall = time.monotonic() - started
            result = ensemble_mean(members)
            classes.append((name, result["ttft_by_class"]))
            p90s = [m["ttft_p90_s"] for m in members]
            rows.append({"picker": name, "wall_s": round(wall, 2), "oracle_hit_rate":
                         round(oracle, 4), **result,
                         **({"ensemble": [
                             {"seed": i, "scrape_phase": i / args.sim_ensemble,
                              **{k: m[k] for k in ENSEMBLE_KEYS},
                              "left_holder": m["placement"]["left_holder"]}
                             for i, m in enumerate(members)]}
                            if len(members) > 1 else {})})
            table.add_row(name, f"{result['ttft_p50_s'] * 1000:.0f}",
                          f"{result['ttft_p90_s'] * 1000:.0f}",
                          *([f"{min(p90s) * 1000:.0f}-{max(p90s) * 1000:.0f}"]
                            if args.sim_ensemble > 1 else []),  # a reference: one run
                          f"{result['ttft_p99_s'] * 1000:.0f}",
                          f"{result['e2e_p50_s'] * 1000:.0f}", f"{result['e2e_p99_s'] * 1000:.0f}",
                          f"{result['output_tokens_per_s']:.1f}",
                          f"{result['goodput_per_s']:.1f}",
                          f"{result['prefix_hit_rate']:.1%}", f"{oracle:.1%}",
                          *(f"{result['recomputed'][c]:.1%}" for c in RECOMPUTE_CAUSES),
                          f"{result['placement']['left_holder']:.1%}",
                          f"{result['placement']['held_nowhere']:.1%}",
                          f"{result['preempted']:g}", f"{result['unfinished']:g}",
                          f"{wall:.1f}")
        console.print(table)
        console.print(class_table(classes))
        stem = f"{args.name}-sim-{label}" if args.name else f"sim-{label}"
        path = out_dir / f"{stem}.json"
        path.write_text(json.dumps({"workload": label, "pods": args.pods, "rate": rate,
                                    "warmup": warmup,
                                    "scheduling_policy": args.scheduling_policy,
                                    "kv_allocation": args.kv_allocation,
                                    "profile": asdict(profile), "params": trace.params,
                                    "results": rows}, indent=1, default=str) + "\n")
        console.print(f"wrote {path}")
    return 0
