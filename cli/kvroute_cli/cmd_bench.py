"""``kvroute bench``: the side-by-side benchmark of routers on real local vLLM engines.

The harness lives in ``bench/kvroute_bench`` (workloads, load generator, contenders, report),
which is not part of the installed distribution; this module puts the checkout's ``bench/``
folder on ``sys.path`` when ``kvroute_bench`` is not importable, then hands over to it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def _bench_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"kvroute_bench.{name}")
    except ModuleNotFoundError:
        bench_dir = REPO_ROOT / "bench"
        if not (bench_dir / "kvroute_bench").is_dir():
            raise SystemExit(f"kvroute bench needs a checkout: {bench_dir}/kvroute_bench "
                             "not found") from None
        sys.path.insert(0, str(bench_dir))
        return importlib.import_module(f"kvroute_bench.{name}")


def _bench(args: argparse.Namespace) -> int:
    module = _bench_module("cli")
    code: int = module.run(args)
    return code


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "bench", help="benchmark routers side by side on local vLLM engines",
        description="Runs one seeded open-loop trace through every contender (direct "
                    "round-robin, kvroute, vllm-router, sglang-router) on the same real "
                    "vLLM-CPU engines, resetting their caches in between, and writes a "
                    "table, JSON and plots.")
    default_out = str(REPO_ROOT / "docs" / "benchmarks" / "results")
    _bench_module("arguments").add_arguments(parser, default_out)
    parser.set_defaults(func=_bench)
