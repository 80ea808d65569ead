"""``kvroute engines``: run local vLLM-CPU engines and print an External pool for them."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import Any


def _engines(args: argparse.Namespace) -> int:
    import yaml

    from kvroute_cli.localengines import LocalEngineFleet

    fleet = LocalEngineFleet(count=args.count, workdir=Path(args.workdir))

    def terminate(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM (kill, timeout) stops the engines too

    signal.signal(signal.SIGTERM, terminate)
    try:
        fleet.start(progress=True)
        pool = fleet.pool_manifest()
        print("# Local engines are up; an External InferencePool for them:")
        print(yaml.safe_dump(pool, sort_keys=False), flush=True)
        deadline = time.monotonic() + args.serve_seconds if args.serve_seconds else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
    return 0


def register(sub: Any) -> None:
    engines = sub.add_parser("engines", help="run local vLLM-CPU engines and print a pool")
    engines.add_argument("--count", type=int, default=2, help="number of engines")
    engines.add_argument("--workdir", default=".kvroute/engines",
                         help="folder for the model files and engine logs")
    engines.add_argument("--serve-seconds", type=float, default=0,
                         help="stop after this many seconds (0: until Ctrl-C)")
    engines.set_defaults(func=_engines)
