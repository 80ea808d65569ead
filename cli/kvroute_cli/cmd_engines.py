"""``kvroute engines``: run local vLLM-CPU engines (or emulated ones) and print a pool for them.

``--emulate`` serves ``--count`` emulated engines from this one process instead
(:mod:`kvroute_emulator`: vLLM's API, metrics and KV events, timing from a cost profile such as
``h100-llama8b``), with the test model's tokenizer, and prints the endpoints JSON
(``kvroute bench --attach`` reads it) and the admin URL for fault injection.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def emulator_arguments() -> ModuleType:
    """``kvroute_emulator.arguments``; from the checkout's ``emulator/`` folder when the
    installed distribution predates the emulator package (an older editable install)."""
    try:
        return importlib.import_module("kvroute_emulator.arguments")
    except ModuleNotFoundError:
        folder = REPO_ROOT / "emulator"
        if not (folder / "kvroute_emulator").is_dir():
            raise
        sys.path.insert(0, str(folder))
        return importlib.import_module("kvroute_emulator.arguments")


def _pool(engines: list[dict[str, Any]], model: str, block_size: int) -> dict[str, Any]:
    return {
        "apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "local"},
        "spec": {"mode": "External", "model": {"name": model},
                 "engine": {"blockSize": block_size}, "resources": {"gpus": 0},
                 "endpoints": [{"name": e["name"], "address": e["url"].removeprefix("http://"),
                                "kvEventsEndpoint": e["kv_events_endpoint"],
                                "kvEventsReplayEndpoint": e["replay_endpoint"]}
                               for e in engines]},
    }


def _emulate(args: argparse.Namespace) -> int:
    import asyncio

    import yaml
    from kvroute_emulator.cli import config_from_args, describe, serve
    from kvroute_emulator.fleet import EmulatedFleet

    from kvroute_cli.testmodel import build_test_model

    args.model_dir = str(build_test_model(Path(args.workdir) / "model"))
    args.served_model_name = "kvroute-test-model"
    config = config_from_args(args)

    def ready(fleet: EmulatedFleet) -> None:
        info = describe(fleet)
        if args.endpoints_file:
            Path(args.endpoints_file).write_text(json.dumps(fleet.endpoints(), indent=1))
        print(f"# {config.count} emulated engines ({info['profile']}, time scale "
              f"{config.time_scale:g}); fault injection at {info['admin_url']}/engines")
        print("# endpoints (kvroute bench --attach FILE):")
        print(json.dumps(info["engines"]))
        print("# an External InferencePool for them:")
        print(yaml.safe_dump(_pool(info["engines"], config.served_model_name,
                                   config.profile.block_size), sort_keys=False), flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, args.serve_seconds, ready))
    return 0


def _engines(args: argparse.Namespace) -> int:
    if args.emulate:
        return _emulate(args)
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
    engines = sub.add_parser("engines", help="run local vLLM-CPU engines (or emulated ones) "
                                             "and print a pool")
    engines.add_argument("--workdir", default=".kvroute/engines",
                         help="folder for the model files and engine logs")
    engines.add_argument("--emulate", action="store_true",
                         help="serve emulated engines from this process (options below) "
                              "instead of starting vLLM-CPU")
    emulator_arguments().add_arguments(engines, model_dir_required=False)
    engines.set_defaults(func=_engines)
