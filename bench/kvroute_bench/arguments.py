"""The arguments of ``kvroute bench``, kept free of heavy imports.

``kvroute`` builds every sub-command's parser on each start, so this module imports nothing
beyond the standard library; the names it offers are checked against the workload and
contender registries by the unit tests.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

WORKLOAD_NAMES = ("chat", "rag", "hotspot", "low-sharing", "precise-prefix")
CONTENDER_NAMES = ("direct-rr", "direct-one", "envoy-rr", "kvroute-approx", "kvroute-precise",
                   "kvroute-precise-load", "kvroute-precise-load-nosat",
                   "kvroute-precise-load-kv95", "kvroute-precise-load-nohead",
                   "kvroute-precise-load-q16", "kvroute-precise-load-q32",
                   "kvroute-precise-cost", "kvroute-precise-cost-fixed-scrape",
                   "kvroute-precise-cost-w1",
                   "kvroute-precise-cost-w2", "kvroute-precise-cost-w5",
                   "kvroute-precise-cost-w10", "kvroute-precise-cost-rw3",
                   "kvroute-precise-cost-rw5",
                   "kvroute-precise-cost-q16", "kvroute-precise-cost-lifo",
                   "kvroute-precise-cost-lifo-t30",
                   "kvroute-precise-cost-lifo-q4", "kvroute-precise-cost-q1000",
                   "kvroute-precise-cost-wait200",
                   "kvroute-precise-cost-wait",
                   "kvroute-precise-cost-nowait", "kvroute-precise-cost-prio0",
                   "kvroute-precise-cost-prio0.05",
                   "kvroute-precise-cost-prio0.2", "kvroute-precise-cost-prio0.5",
                   "kvroute-precise-cost-prio1", "kvroute-precise-cost-norun",
                   "kvroute-precise-cost-noforecast",
                   "kvroute-precise-cost-nohead",
                   "kvroute-precise-cost-asyncio",
                   "kvroute-queue", "kvroute-precise-queue", "vllm-router-rr",
                   "vllm-router-cache", "vllm-router-kv", "sglang-router-cache", "smg-cache")


def _names(valid: tuple[str, ...]) -> Callable[[str], str]:
    def check(text: str) -> str:
        bad = [n for n in text.split(",") if n.strip() and n.strip() not in valid]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad)}; valid: {', '.join(valid)}")
        return text
    return check


def add_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--workload", type=_names(WORKLOAD_NAMES), default="chat",
                        help=f"comma-separated, run one after the other on the same engines: "
                             f"{', '.join(WORKLOAD_NAMES)}")
    parser.add_argument("--requests", type=int, default=60,
                        help="measured requests per contender (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="requests sent first and excluded from the results")
    parser.add_argument("--warmup-mode", choices=("drain", "continuous"), default="drain",
                        help="drain: wait for the warm-up to finish, then measure from an idle "
                             "fleet with warm caches; continuous: the warm-up flows straight "
                             "into the measured requests, which start on the queues it left "
                             "(a steady state: use a warm-up long enough to reach one)")
    parser.add_argument("--rate", default="1.0",
                        help="arrival rate, requests/s: one, or one per workload, "
                             "comma-separated; several with a single workload sweep the rate "
                             "(the same prompts at each rate, plus a <workload>-sweep summary)")
    parser.add_argument("--slo-ttft", type=float, default=1.0, metavar="SECONDS",
                        help="TTFT objective for the sweep's goodput (requests/s that met it)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over all contenders, order reversed every other round; "
                             "results pool every round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="workload parameter override (repeatable; single workload only), "
                             "e.g. tenants=16 or "
                             "system=1200:0.35:400:2000 (median:sigma:low:high)")
    parser.add_argument("--contenders", default="",
                        help=f"comma-separated; default: all present except kvroute's A/B "
                             f"variants. Known: "
                             f"{', '.join(CONTENDER_NAMES)}")
    parser.add_argument("--replicas", type=int, default=1,
                        help="independent copies of each router (own process, KV-event "
                             "subscriptions and cache); the client spreads requests over them "
                             "round-robin per request, like L7 balancing in front of a "
                             "Deployment. Router CPU is summed over them")
    parser.add_argument("--replica-sync", action="store_true",
                        help="with --replicas: kvroute's copies share their dispatches "
                             "(pending KV blocks, dispatch counts) through a throwaway "
                             "redis-server, as --replica-sync-redis-url does in a cluster; "
                             "the peers have no such option and run unchanged")
    parser.add_argument("--engines", type=int, default=2, help="number of vLLM-CPU engines")
    parser.add_argument("--kv-blocks", type=int, default=384,
                        help="KV blocks per engine (--num-gpu-blocks-override; 0: vLLM's "
                             "default from 1 GiB). Small enough that one engine cannot hold "
                             "the whole working set")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--attach", help="JSON list of running engines instead of starting")
    parser.add_argument("--bench-venv", help="venv with vllm-router and sglang-router "
                                             "(default: $KVROUTE_BENCH_VENV or kvenv.sh bench)")
    parser.add_argument("--request-timeout", type=float, default=180.0)
    parser.add_argument("--out", default=default_out, help="folder for JSON, table and plots")
    parser.add_argument("--name", help="prefix of the output file names (default: none; the "
                                       "workload names them)")
    parser.add_argument("--cross-check", action="store_true",
                        help="after the contenders, replay each measured trace with aiperf "
                             "(direct round-robin) and record its percentiles beside ours")
    parser.add_argument("--fleet", choices=("real", "emulated"), default="real",
                        help="real: vLLM-CPU engines; emulated: kvroute's engine emulator "
                             "(python -m kvroute_emulator) with --profile's timing")
    parser.add_argument("--time-scale", type=float, default=0,
                        help="emulated fleet: wall seconds per emulated second (0: 1 for the "
                             "cpu profile, the engine count for h100-llama8b). Arrivals are "
                             "stretched and measured latencies divided by it")
    parser.add_argument("--trace", metavar="FILE",
                        help="replay a JSONL trace (Mooncake or OpenAI-style) instead of "
                             "--workload; --requests/--warmup take its first requests")
    parser.add_argument("--trace-format", choices=("auto", "mooncake", "openai"),
                        default="auto")
    parser.add_argument("--trace-time-scale", type=float, default=1.0,
                        help="multiply the trace's arrival times (0.5: twice as fast)")
    parser.add_argument("--max-context", type=int, default=0,
                        help="context limit for traces and the emulated engines (0: the "
                             "profile's default; 4096 on real engines)")
    parser.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs",
                        help="the engines' vLLM --scheduling-policy (real, emulated and "
                             "simulated). priority: kvroute's pool declares it and kvroute sets "
                             "each request's priority (scoring.prefillPriorityMsPerToken); the "
                             "peers send none, which the engines serve in arrival order")
    parser.add_argument("--kv-allocation", choices=("reserve", "on-demand"), default="on-demand",
                        help="the emulated and simulated engines' KV allocation: on-demand "
                             "(the default, vLLM's: blocks as steps fill them, preempting when "
                             "they run out) or reserve (a request's blocks at admission, no "
                             "preemption; the rounds published before round 59)")
    sim = parser.add_argument_group("fleet simulator (--sim)")
    sim.add_argument("--sim", action="store_true",
                     help="simulate the pods instead of starting real engines")
    sim.add_argument("--pods", type=int, default=16, help="simulated engines")
    sim.add_argument("--profile", default="cpu",
                     help="cost profile of a simulated or emulated engine: cpu, h100-llama8b "
                          "(alias h100), or (emulated) a JSON file of CostProfile fields")
    sim.add_argument("--sim-pickers", default="round-robin,kvroute-approx,kvroute-precise-cost",
                     help="comma-separated: round-robin, kvroute-approx-load, or any kvroute "
                          "contender (kvroute-precise-cost, the default scoring, and its "
                          "variants); kvroute ones optionally @MS (a scrape interval) and /xN "
                          "or /xNshared (N replicas, see the docs), then ~MS (the replicas run as "
                          "processes, replica sync taking MS simulated ms)")
    sim.add_argument("--sim-pending-ttl", type=float, default=None, metavar="SECONDS",
                     help="how long kvroute pickers' pending-block marks last, simulated s "
                          "(default: the router's 5 s; an emulated fleet at time scale S "
                          "gives them 5/S)")
    sim.add_argument("--sim-ensemble", type=int, default=1, metavar="K",
                     help="run each kvroute picker K times, run k with tie-break stream k and "
                          "its scrapes k/K of an interval earlier, and report the mean (and "
                          "the p90's range): near saturation one run's TTFT swings by half "
                          "with a millisecond's change (docs/benchmarks/emulated-fleet.md, "
                          "round 41); default 1")
    parser.add_argument("--workdir", default=".kvroute/bench",
                        help="folder for engine and router logs")
