"""``python -m kvroute_emulator`` (and ``kvroute engines --emulate``): serve N emulated engines.

Prints the engines' endpoints as JSON (the list ``kvroute bench --attach`` reads; also written
to ``--endpoints-file``) once every engine listens, then serves until Ctrl-C / SIGTERM or
``--serve-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvroute_emulator.arguments import DEFAULT_MAX_MODEL_LEN, add_arguments
from kvroute_emulator.fleet import EmulatedFleet, FleetConfig
from kvroute_emulator.model.profile import named_profile


def config_from_args(args: argparse.Namespace) -> FleetConfig:
    try:
        profile = named_profile(args.profile, args.kv_blocks, args.block_size)
    except ValueError as exc:
        raise SystemExit(f"--profile: {exc}") from None
    max_len = args.max_model_len or DEFAULT_MAX_MODEL_LEN.get(args.profile, 4096)
    config = FleetConfig(count=args.count, profile=profile, model_dir=Path(args.model_dir),
                         served_model_name=args.served_model_name,
                         time_scale=args.time_scale, max_model_len=max_len,
                         admin_port=args.admin_port, eos_after=args.eos_after,
                         scheduling_policy=args.scheduling_policy,
                         kv_allocation=args.kv_allocation)
    try:
        config.check()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return config


async def serve(config: FleetConfig, serve_seconds: float = 0,
                on_ready: Callable[[EmulatedFleet], None] | None = None) -> None:
    fleet = EmulatedFleet(config)
    await fleet.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        if on_ready is not None:
            on_ready(fleet)
        if serve_seconds:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), serve_seconds)
        else:
            await stop.wait()
    finally:
        await fleet.stop()


def describe(fleet: EmulatedFleet) -> dict[str, Any]:
    c = fleet.config
    return {"engines": fleet.endpoints(),
            "admin_url": f"http://{c.host}:{fleet.admin_port}",
            "profile": c.profile.name, "time_scale": c.time_scale,
            "block_size": c.profile.block_size, "kv_blocks": c.profile.kv_blocks,
            "max_model_len": c.max_model_len, "model": c.served_model_name,
            "scheduling_policy": c.scheduling_policy, "kv_allocation": c.kv_allocation}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvroute_emulator",
                                     description="Serve N emulated vLLM engines on loopback.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)

    def ready(fleet: EmulatedFleet) -> None:
        info = describe(fleet)
        if args.endpoints_file:
            Path(args.endpoints_file).write_text(json.dumps(fleet.endpoints(), indent=1))
        print(json.dumps(info, indent=1), flush=True)

    asyncio.run(serve(config, args.serve_seconds, ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
