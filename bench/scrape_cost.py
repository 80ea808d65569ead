"""CPU per metrics scrape, the whole vLLM page against the page restricted to the router's series.

The router scrapes every endpoint every 100 ms, with or without traffic, and vLLM renders its
whole ``/metrics`` page (~54 KB, hundreds of histogram buckets) for each GET in the API-server
process that also serves the engine's requests. vLLM also answers ``/metrics/?name[]=...``
with only the named samples (``kvroute_router.scrape.scraper.FILTERED_PATH``). This bench
scrapes one running engine ``--scrapes`` times through the router's own scrape connection and
parser (``MetricsConnection.get`` + ``parse_vllm_metrics``, what ``MetricsScraper.scrape_once``
does), back to back, alternating the two paths over ``--rounds`` rounds, and reports per GET:

* the page's size;
* this process's CPU (``time.process_time``): the router's share of a scrape;
* the engine's CPU (``/proc/PID/stat`` of ``--engine-pid``, user + system): what rendering
  the page costs the engine.

Point it at a real engine (``kvroute engines --count 1`` prints its address; the API server's
pid is the process listening there) or an emulated one; loopback only.

    python bench/scrape_cost.py --address 127.0.0.1:PORT --engine-pid PID [--scrapes 300]
        [--rounds 3] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from kvroute_bench.contenders import process_cpu_seconds
from kvroute_router.scrape.connection import MetricsConnection
from kvroute_router.scrape.scraper import FILTERED_PATH, FULL_PATH
from kvroute_router.scrape.vllm_metrics import parse_vllm_metrics

PATHS = {"whole": FULL_PATH, "restricted": FILTERED_PATH}


async def one_round(address: str, path: str, scrapes: int, engine_pid: int | None
                    ) -> dict[str, float]:
    connection = MetricsConnection(address, path)
    try:
        status, body = await connection.get()  # connect outside the measurement
        if status != 200:
            raise SystemExit(f"{address}{path} answered HTTP {status}")
        engine_before = process_cpu_seconds(engine_pid) if engine_pid else 0.0
        cpu_before, wall_before = time.process_time(), time.monotonic()
        for _ in range(scrapes):
            status, body = await connection.get()
            parse_vllm_metrics(body.decode("utf-8"), time.monotonic())
        cpu = time.process_time() - cpu_before
        wall = time.monotonic() - wall_before
        engine = process_cpu_seconds(engine_pid) - engine_before if engine_pid else float("nan")
    finally:
        connection.close()
    return {"bytes": float(len(body)), "router_cpu_ms": 1000 * cpu / scrapes,
            "engine_cpu_ms": 1000 * engine / scrapes, "wall_ms": 1000 * wall / scrapes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="the engine's host:port (loopback)")
    parser.add_argument("--engine-pid", type=int, default=None,
                        help="the engine's API-server process, for its CPU per GET")
    parser.add_argument("--scrapes", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.address.startswith(("127.", "localhost:", "[::1]")):
        parser.error("loopback addresses only")
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in PATHS}
    for number in range(args.rounds):
        for name, path in PATHS.items():
            result = asyncio.run(one_round(args.address, path, args.scrapes, args.engine_pid))
            rounds[name].append(result)
            print(f"round {number + 1} {name:10s} {result['bytes']:8.0f} B  router "
                  f"{result['router_cpu_ms']:.3f} ms  engine {result['engine_cpu_ms']:.3f} ms"
                  f"  wall {result['wall_ms']:.3f} ms per GET", flush=True)
    summary = {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for name, results in rounds.items()}
    print(f"\nmedians of {args.rounds} rounds x {args.scrapes} GETs (load average "
          f"{os.getloadavg()[0]:.1f})")
    print("| page | bytes | router CPU ms/GET | engine CPU ms/GET | wall ms/GET |")
    print("|---|---|---|---|---|")
    for name, values in summary.items():
        print(f"| {name} | {values['bytes']:,.0f} | {values['router_cpu_ms']:.3f} | "
              f"{values['engine_cpu_ms']:.3f} | {values['wall_ms']:.3f} |")
    if args.json is not None:
        data: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                                "rounds": rounds, "summary": summary,
                                "loadavg": os.getloadavg()}
        args.json.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
