"""Soak: a steady rate through the router's proxy for a long time; does anything grow?

Issue 16 item 4. One command starts an emulated fleet (``kvroute engines --emulate``: vLLM's
HTTP API, ``/metrics`` and KV events over real ZMQ sockets, the byte-level test model's
tokenizer; docs/emulator.md), one ``kvroute router`` process in front of it (the OpenAI proxy,
``prefix-precise`` scoring from the engines' KV events, a RoutePolicy with a budget of tokens
and requests per minute and a concurrency cap, so reservation, settle and admission run on
every request), and drives it open loop for ``--duration-s`` at ``--rate`` requests/s
(Poisson arrivals):

* the chat workload of ``kvroute bench`` (``bench/kvroute_bench/workloads.py``: tenants'
  system prompts, multi-turn sessions, so prompts share prefixes), each request sent as
  ``/v1/completions`` or ``/v1/chat/completions``, streaming or not, with the tenant in
  ``x-kvroute-tenant`` (the client is a trusted hop);
* ``--disconnect-share`` of streams are dropped by the client after the first chunk;
* ``--invalid-share`` of requests carry an invalid body (``"messages": [1]``, a non-JSON body,
  ``max_tokens: -1``) and must get 400 with an OpenAI error body.

Every ``--sample-s`` it reads the router's ``/metrics`` (``process_resident_memory_bytes``,
``process_open_fds``, ``kvroute_asyncio_tasks``, ``kvroute_internal_entries{table}``,
``kvroute_kv_index_blocks{endpoint}``, ``kvroute_in_flight_requests``,
``kvroute_budget_in_flight``, ``kvroute_admission_queue_depth``) and counts ``/proc/PID/fd``
itself as a cross-check. Growth is the least-squares slope per hour over the samples after
``--warmup-s``. Writes ``soak.json``, ``soak.png`` and ``soak.md`` into ``--out``.

    nice -n 10 python bench/soak.py --duration-s 1200 --rate 4 --out docs/benchmarks

Requests: *sent*; *ok* (200 and a complete body: a stream ending in ``[DONE]``, a JSON answer
with ``usage``); *rejected* (400 for an invalid body, as expected; 429 from admission);
*disconnected* (dropped by the client on purpose); *failed* (any other answer); *lost* (no
answer within ``--request-timeout-s``, or the connection broke). Loopback only; every wait is
bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml
from kvroute_bench import promtext
from kvroute_bench.contenders import EngineInfo, FleetInfo, free_port, kvroute_config
from kvroute_bench.workloads import ChatParams, LogNormal, TraceRequest, chat_trace

MODEL = "kvroute-test-model"
TENANT_HEADER = "x-kvroute-tenant"

# The series sampled (name in the JSON → what it is); each is one number per sample.
SERIES = {
    "rss_mb": "router RSS (MiB)",
    "open_fds": "router open fds (/proc/PID/fd)",
    "asyncio_tasks": "asyncio tasks on the router's loop",
    "index_blocks": "KV index blocks, all engines",
    "in_flight": "requests in flight (kvroute_in_flight_requests)",
    "budget_in_flight": "reservations in flight (kvroute_budget_in_flight)",
    "admission_queue": "admission queue depth",
}


@dataclass
class Tally:
    """What the client saw, by outcome."""

    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def add(self, outcome: str, detail: str = "") -> None:
        self.counts[outcome] += 1
        if outcome in ("failed", "lost") and len(self.failures) < 20:
            self.failures.append(detail[:300])


def router_config(fleet: FleetInfo, max_concurrency: int) -> list[dict[str, Any]]:
    """The bench's External pool and RoutePolicy (``kvroute_config``) with a budget per tenant
    and the precise scorer plus a load scorer."""
    docs = kvroute_config(fleet, [{"type": "prefix-precise", "weight": 3.0},
                                  {"type": "queue-depth", "weight": 1.0}])
    spec = docs[1]["spec"]
    spec["tenancy"] = {"source": "Header", "header": TENANT_HEADER}
    spec["budgets"] = [{"name": "per-tenant", "tenant": "*", "tokensPerMinute": 10**8,
                        "requestsPerMinute": 10**6, "maxConcurrency": max_concurrency}]
    return docs


def start_fleet(workdir: Path, engines: int, profile: str = "cpu"
                ) -> tuple[subprocess.Popen[bytes], FleetInfo]:
    """``kvroute engines --emulate`` in its own process; its endpoints once it serves.

    ``profile`` sets only what the engines' compute costs: the KV size and block size stay
    the cpu test engine's (384 blocks of 32 tokens), so the router's tables see the same
    prompts and blocks whichever profile runs."""
    endpoints_file = workdir / "engines.json"
    log = (workdir / "fleet.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "kvroute_cli.main", "engines", "--emulate", "--count",
         str(engines), "--profile", profile, "--kv-blocks", "384", "--block-size", "32",
         "--max-model-len", "4096", "--workdir", str(workdir / "fleet"),
         "--endpoints-file", str(endpoints_file)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while not endpoints_file.exists() or not endpoints_file.read_text().strip():
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"the emulated fleet did not start; see {workdir / 'fleet.log'}")
        time.sleep(0.5)
    entries = json.loads(endpoints_file.read_text())
    infos = [EngineInfo(name=e["name"], url=e["url"], kv_events_endpoint=e["kv_events_endpoint"],
                        replay_endpoint=e["replay_endpoint"]) for e in entries]
    return process, FleetInfo(engines=infos, model=MODEL, block_size=32,
                              model_dir=workdir / "fleet" / "model")


def start_router(workdir: Path, fleet: FleetInfo, port: int, max_concurrency: int,
                 memtrace_dir: Path | None = None, memtrace_every_s: float = 0.0,
                 memtrace_options: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """``kvroute router`` as its own process; with ``memtrace_dir``, under
    ``bench/memtrace.py`` (heap snapshots, or with ``--no-trace`` only the allocators'
    figures, every ``memtrace_every_s``; ``memtrace_options`` are memtrace's own)."""
    config = workdir / "router.yaml"
    config.write_text(yaml.safe_dump_all(router_config(fleet, max_concurrency), sort_keys=False))
    log = (workdir / "router.log").open("wb")
    launcher = [sys.executable, "-m", "kvroute_cli.main"]
    if memtrace_dir is not None:
        launcher = [sys.executable, str(Path(__file__).with_name("memtrace.py")), "run",
                    "--every", str(memtrace_every_s), "--out", str(memtrace_dir),
                    *memtrace_options, "--"]
    argv = [*launcher, "router", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(port), "--ext-proc-port", "-1",
            "--grpc-port", "-1", "--metrics-port", "-1", "--log-level", "warning",
            "--trusted-proxy-cidr", "127.0.0.1/32",
            "--tokenizer-dir", f"{fleet.model}={fleet.model_dir}"]
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> int | None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=10)
    return process.returncode


async def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("the router exited while starting")
            try:
                async with s.get(f"{url}/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("the router did not become ready")


def sample(text: str, pid: int, elapsed_s: float) -> dict[str, Any]:
    """One row of the table from a ``/metrics`` page (and ``/proc`` for the fd cross-check)."""
    samples = promtext.parse(text)

    def labelled(name: str, label: str) -> dict[str, float]:
        return {dict(labels).get(label, ""): v for (n, labels), v in samples.items()
                if n == name}

    try:
        proc_fds = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        proc_fds = -1
    return {
        "t_s": round(elapsed_s, 1),
        "rss_mb": promtext.total(samples, "process_resident_memory_bytes") / 2**20,
        "open_fds": proc_fds,
        "metric_open_fds": promtext.total(samples, "process_open_fds"),
        "asyncio_tasks": promtext.total(samples, "kvroute_asyncio_tasks"),
        "index_blocks": promtext.total(samples, "kvroute_kv_index_blocks"),
        "index_blocks_by_engine": labelled("kvroute_kv_index_blocks", "endpoint"),
        "in_flight": promtext.total(samples, "kvroute_in_flight_requests"),
        "budget_in_flight": promtext.total(samples, "kvroute_budget_in_flight"),
        "admission_queue": promtext.total(samples, "kvroute_admission_queue_depth"),
        "tables": labelled("kvroute_internal_entries", "table"),
    }


def invalid_body(rng: random.Random) -> tuple[str, bytes]:
    choice = rng.randrange(3)
    if choice == 0:
        return "/v1/chat/completions", json.dumps({"model": MODEL, "messages": [1]}).encode()
    if choice == 1:
        return "/v1/completions", b'{"model": "' + MODEL.encode() + b'", "prompt": '
    return "/v1/completions", json.dumps({"model": MODEL, "prompt": "x",
                                          "max_tokens": -1}).encode()


async def send(session: aiohttp.ClientSession, url: str, request: TraceRequest,
               rng: random.Random, args: argparse.Namespace, tally: Tally) -> None:
    tally.add("sent")
    headers = {TENANT_HEADER: request.group}
    timeout = aiohttp.ClientTimeout(total=args.request_timeout_s)
    if rng.random() < args.invalid_share:
        path, data = invalid_body(rng)
        try:
            async with session.post(f"{url}{path}", data=data, timeout=timeout,
                                    headers={**headers, "content-type": "application/json"}
                                    ) as resp:
                answer = await resp.read()
                ok = resp.status == 400 and "error" in json.loads(answer)
                tally.add("rejected_400" if ok else "failed",
                          f"invalid: {resp.status} {answer!r}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            tally.add("lost", f"invalid: {exc!r}")
        return
    stream = rng.random() < 0.5
    chat = rng.random() < 0.5
    text: dict[str, Any] = ({"messages": [{"role": "user", "content": request.prompt}]}
                            if chat else {"prompt": request.prompt})
    body = {"model": MODEL, **text, "max_tokens": request.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    disconnect = stream and rng.random() < args.disconnect_share
    try:
        async with session.post(f"{url}{path}", json=body, headers=headers,
                                timeout=timeout) as resp:
            if disconnect and resp.status == 200:
                await resp.content.readany()
                resp.close()  # drop the connection mid-stream
                tally.add("disconnected")
                return
            data = await resp.read()
            if resp.status == 429:
                tally.add("rejected_429")
                return
            if resp.status != 200:
                tally.add("failed", f"{resp.status} {data[:200]!r}")
                return
            if stream:
                complete = data.rstrip().endswith(b"data: [DONE]") and b'"usage"' in data
            else:
                complete = "usage" in json.loads(data)
            tally.add("ok" if complete else "failed", f"incomplete: {data[-200:]!r}")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        tally.add("lost", f"{type(exc).__name__}: {exc}")


def trace(args: argparse.Namespace) -> list[TraceRequest]:
    count = max(1, math.ceil(args.rate * args.duration_s))
    params = ChatParams(requests=count, rate=args.rate, seed=args.seed, tenants=args.tenants,
                        system=LogNormal(600, 0.35, 200, 1200),
                        output=LogNormal(12, 0.5, 4, 32))
    return [r for r in chat_trace(params) if r.arrival_s < args.duration_s]


async def drive(args: argparse.Namespace, url: str, pid: int) -> tuple[list[dict[str, Any]],
                                                                        Tally]:
    requests = trace(args)
    rng = random.Random(args.seed)
    tally = Tally()
    rows: list[dict[str, Any]] = []
    start = time.monotonic()
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:
        pending: set[asyncio.Task[None]] = set()

        async def sampler() -> None:
            while True:
                try:
                    async with session.get(f"{url}/metrics",
                                           timeout=aiohttp.ClientTimeout(total=10)) as resp:
                        row = sample(await resp.text(), pid, time.monotonic() - start)
                    row["sent"] = tally.counts["sent"]
                    rows.append(row)
                    print(f"t={row['t_s']:7.1f}s rss={row['rss_mb']:.1f}MiB "
                          f"fds={row['open_fds']} tasks={row['asyncio_tasks']:.0f} "
                          f"index={row['index_blocks']:.0f} in_flight={row['in_flight']:.0f} "
                          f"{dict(tally.counts)}", flush=True)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    print(f"sample failed: {exc!r}", flush=True)
                await asyncio.sleep(args.sample_s)

        sampling = asyncio.create_task(sampler())
        for request in requests:
            delay = start + request.arrival_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send(session, url, request, rng, args, tally))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=args.request_timeout_s + 10)
        # Settle: a last sample once everything has finished.
        await asyncio.sleep(min(args.sample_s, 5))
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
        async with session.get(f"{url}/metrics") as resp:
            row = sample(await resp.text(), pid, time.monotonic() - start)
            row["sent"] = tally.counts["sent"]
            rows.append(row)
    return rows, tally


def slope_per_hour(rows: list[dict[str, Any]], key: str, warmup_s: float) -> float:
    points = [(r["t_s"], float(r[key])) for r in rows if r["t_s"] >= warmup_s]
    if len(points) < 3:
        return math.nan
    t, y = np.array(points).T
    return float(np.polyfit(t, y, 1)[0] * 3600.0)


def growth(rows: list[dict[str, Any]], warmup_s: float) -> dict[str, dict[str, float]]:
    """Per series: value at the end of warm-up and at the end, least-squares slope per hour."""
    after = [r for r in rows if r["t_s"] >= warmup_s] or rows
    keys = list(SERIES) + [f"table:{k}" for k in sorted(rows[-1]["tables"])]
    flat = [{**r, **{f"table:{k}": v for k, v in r["tables"].items()}} for r in rows]
    out = {}
    for key in keys:
        out[key] = {"start": float(after[0].get(key, 0.0) if key in SERIES
                                   else after[0]["tables"].get(key[6:], 0.0)),
                    "end": float(flat[-1].get(key, 0.0)),
                    "max": max(float(r.get(key, 0.0)) for r in flat),
                    "slope_per_h": slope_per_hour(
                        [{"t_s": r["t_s"], key: r.get(key, 0.0)} for r in flat], key,
                        warmup_s)}
    return out


def plot(rows: list[dict[str, Any]], warmup_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    panels = [("rss_mb", "RSS (MiB)"), ("open_fds", "open fds"),
              ("asyncio_tasks", "asyncio tasks"), ("index_blocks", "KV index blocks"),
              ("in_flight", "in flight"), ("tables", "internal table entries")]
    fig, axes = plt.subplots(3, 2, figsize=(11, 9), sharex=True)
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        if key == "tables":  # the ones that change; a log scale, they span 1 to millions
            for table in sorted(rows[-1]["tables"]):
                values = [r["tables"].get(table, 0) for r in rows]
                if max(values) > min(values):
                    ax.plot(t, values, label=table)
            ax.set_yscale("symlog", linthresh=10)
            if ax.get_lines():
                ax.legend(fontsize=6, ncol=2)
        else:
            ax.plot(t, [r[key] for r in rows])
        ax.axvline(warmup_s / 60, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("minutes")
    fig.suptitle("kvroute router soak (dotted: end of warm-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def report(data: dict[str, Any], command: str) -> str:
    meta, tally, grow, rows = data["meta"], data["requests"], data["growth"], data["samples"]
    lines = [
        "# Soak: the router under a steady rate",
        "",
        "Issue 16 item 4. `bench/soak.py` (its docstring has the details): an emulated fleet of "
        f"{meta['engines']} engines (`kvroute engines --emulate`, {meta.get('profile', 'cpu')} "
        "profile, KV events on), one "
        "`kvroute router` process (proxy, `prefix-precise` x3 + `queue-depth`, a per-tenant "
        "budget of tokens and requests per minute and a concurrency cap, tenants from "
        "`x-kvroute-tenant`), Poisson arrivals of the chat workload (shared system prompts, "
        "multi-turn sessions) as completions and chat completions, half streaming, with a "
        "share of client disconnects mid-stream and invalid bodies. The router's `/metrics` is "
        f"sampled every {meta['sample_s']:g} s.",
        "",
        "```",
        command,
        "```",
        "",
        f"Run: {meta['started']}, {meta['duration_s']:g} s at {meta['rate']:g} requests/s, "
        f"{meta['tenants']} tenants, disconnect share {meta['disconnect_share']:g}, invalid "
        f"share {meta['invalid_share']:g}, warm-up {meta['warmup_s']:g} s; machine: "
        f"{meta['machine']}; load average at start {meta['load_start']}, at end "
        f"{meta['load_end']}. Router exit code on SIGTERM: {meta['router_exit']}.",
        "",
        "## Requests",
        "",
        "| sent | ok | rejected 400 (invalid body) | rejected 429 | disconnected (on purpose) "
        "| failed | lost |",
        "|---|---|---|---|---|---|---|",
        f"| {tally.get('sent', 0)} | {tally.get('ok', 0)} | {tally.get('rejected_400', 0)} | "
        f"{tally.get('rejected_429', 0)} | {tally.get('disconnected', 0)} | "
        f"{tally.get('failed', 0)} | {tally.get('lost', 0)} |",
        "",
        "## Growth after warm-up",
        "",
        "Least-squares slope over the samples after the warm-up, per hour; *start* is the first "
        "sample after the warm-up.",
        "",
        "| series | start | end | max | slope per hour |",
        "|---|---|---|---|---|",
    ]
    for key, g in grow.items():
        name = SERIES.get(key, f"`{key[6:]}` entries" if key.startswith("table:") else key)
        lines.append(f"| {name} | {g['start']:.1f} | {g['end']:.1f} | {g['max']:.1f} | "
                     f"{g['slope_per_h']:+.1f} |")
    lines += ["", "## Over time", "",
              "| t (s) | sent | RSS MiB | fds | tasks | index blocks (per engine) | in flight "
              "| reservations | queue |",
              "|---|---|---|---|---|---|---|---|---|"]
    step = max(1, len(rows) // 24)
    for r in rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else []):
        per_engine = " / ".join(f"{v:.0f}" for _, v in sorted(r["index_blocks_by_engine"].items()))
        lines.append(f"| {r['t_s']:.0f} | {r['sent']} | {r['rss_mb']:.1f} | {r['open_fds']} | "
                     f"{r['asyncio_tasks']:.0f} | {r['index_blocks']:.0f} ({per_engine}) | "
                     f"{r['in_flight']:.0f} | {r['budget_in_flight']:.0f} | "
                     f"{r['admission_queue']:.0f} |")
    lines += ["", "![soak](soak.png)", ""]
    if data["failures"]:
        lines += ["Failures (first 20):", ""] + [f"* `{f}`" for f in data["failures"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=1200.0)
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second")
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--profile", default="cpu",
                        help="the emulated engines' compute cost (cpu, h100-llama8b): a fast "
                             "profile carries a higher rate on fewer engines, so the router's "
                             "per-endpoint tables fill sooner; KV and block size stay the cpu "
                             "engine's")
    parser.add_argument("--tenants", type=int, default=24)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=120.0)
    parser.add_argument("--disconnect-share", type=float, default=0.03)
    parser.add_argument("--invalid-share", type=float, default=0.02)
    parser.add_argument("--max-concurrency", type=int, default=64,
                        help="the budget's concurrency cap per tenant")
    parser.add_argument("--request-timeout-s", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tracemalloc-every", type=float, default=0.0, metavar="SECONDS",
                        help="run the router under bench/memtrace.py: a heap snapshot every "
                             "SECONDS into OUT/tracemalloc (then: python bench/memtrace.py "
                             "report OUT/tracemalloc); tracing distorts RSS and CPU")
    parser.add_argument("--malloc-every", type=float, default=0.0, metavar="SECONDS",
                        help="without tracing: the router's RSS and glibc's mallinfo2 every "
                             "SECONDS into OUT/malloc/malloc.log (bench/memtrace.py --no-trace)")
    parser.add_argument("--small-tables", action="store_true",
                        help="shrink the router's bounded tables (bench/memtrace.py "
                             "--small-tables) so they are full within minutes: RSS growth "
                             "after that is not a table filling")
    parser.add_argument("--out", type=Path, default=None,
                        help="write soak.json, soak.png, soak.md here")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--replot", type=Path, default=None, metavar="SOAK_JSON",
                        help="only redraw the plot of a finished run into --out")
    args = parser.parse_args(argv)
    if args.replot is not None:
        data = json.loads(args.replot.read_text())
        plot(data["samples"], data["meta"]["warmup_s"], (args.out or Path()) / "soak.png")
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kvroute-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    fleet_process, fleet = start_fleet(workdir, args.engines, args.profile)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    traces: Path | None = None
    every, options = 0.0, tuple[str, ...]()
    if args.tracemalloc_every:
        traces, every = (args.out or workdir) / "tracemalloc", args.tracemalloc_every
    elif args.malloc_every or args.small_tables:
        traces, every, options = ((args.out or workdir) / "malloc", args.malloc_every or 60.0,
                                  ("--no-trace",))
    if args.small_tables:
        options = (*options, "--small-tables")
    router = start_router(workdir, fleet, port, args.max_concurrency, traces, every, options)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        asyncio.run(wait_ready(url, router))
        rows, tally = asyncio.run(drive(args, url, router.pid))
    finally:
        router_exit = stop(router)
        stop(fleet_process)
    data = {
        "meta": {"started": started, "duration_s": args.duration_s, "rate": args.rate,
                 "engines": args.engines, "profile": args.profile, "tenants": args.tenants,
                 "sample_s": args.sample_s,
                 "warmup_s": args.warmup_s, "disconnect_share": args.disconnect_share,
                 "invalid_share": args.invalid_share, "seed": args.seed,
                 "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                 "load_start": [round(x, 1) for x in load_start],
                 "load_end": [round(x, 1) for x in os.getloadavg()],
                 "router_exit": router_exit, "workdir": str(workdir)},
        "requests": dict(tally.counts),
        "failures": tally.failures,
        "growth": growth(rows, args.warmup_s),
        "samples": rows,
    }
    command = "nice -n 10 python bench/soak.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    text = report(data, command)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak.json").write_text(json.dumps(data, indent=1))
        plot(rows, args.warmup_s, args.out / "soak.png")
        (args.out / "soak.md").write_text(text)
    return 0 if tally.counts["lost"] == 0 and tally.counts["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
