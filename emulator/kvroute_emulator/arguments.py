"""The emulator's command-line options, kept free of heavy imports (``kvroute`` builds every
sub-command's parser at start-up; ``kvroute engines --emulate`` shares these)."""

from __future__ import annotations

import argparse

from kvroute_emulator.model.engine import (
    DEFAULT_KV_ALLOCATION,
    KV_ALLOCATIONS,
    SCHEDULING_POLICIES,
)
from kvroute_emulator.model.profile import PROFILE_NAMES

DEFAULT_MAX_MODEL_LEN = {"cpu": 4096, "h100-llama8b": 32768}


def add_arguments(parser: argparse.ArgumentParser, model_dir_required: bool = True) -> None:
    parser.add_argument("--count", type=int, default=2, help="number of emulated engines")
    parser.add_argument("--profile", default="cpu",
                        help=f"engine cost profile: {', '.join(PROFILE_NAMES)} or a JSON file "
                             "of CostProfile fields")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="wall seconds per emulated second (>1 slows the fleet down so "
                             "one process keeps up with many fast engines; clients divide "
                             "measured latencies by it)")
    parser.add_argument("--kv-blocks", type=int, default=0,
                        help="KV blocks per engine (0: the profile's)")
    parser.add_argument("--block-size", type=int, default=0,
                        help="tokens per KV block (0: the profile's)")
    parser.add_argument("--max-model-len", type=int, default=0,
                        help="context limit in tokens (0: 4096 for cpu, 32768 for h100-llama8b)")
    parser.add_argument("--eos-after", type=int, default=0,
                        help="stop requests without ignore_eos after this many tokens, "
                             "finish_reason stop (0: run to max_tokens)")
    parser.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default="fcfs",
                        help="vLLM's waiting-queue order: fcfs (arrival) or priority (the "
                             "requests' priority field, lower first, then arrival; default "
                             "%(default)s, as vLLM)")
    parser.add_argument("--kv-allocation", choices=KV_ALLOCATIONS, default=DEFAULT_KV_ALLOCATION,
                        help="reserve: a request's KV blocks, prompt and output, are taken "
                             "at admission, so nothing is preempted; on-demand: as vLLM, a "
                             "step takes the blocks it fills and a sequence short of blocks "
                             "preempts one (the newest, or the lowest priority), which is "
                             "prefilled again later (default %(default)s, as vLLM; reserve "
                             "reproduces the benchmark rounds before 59)")
    parser.add_argument("--admin-port", type=int, default=0,
                        help="port of the fault-injection API (0: any free port)")
    parser.add_argument("--endpoints-file", help="also write the endpoints JSON here")
    parser.add_argument("--serve-seconds", type=float, default=0,
                        help="stop after this many seconds (0: until interrupted)")
    if model_dir_required:
        parser.add_argument("--model-dir", required=True,
                            help="folder with the served model's tokenizer.json and "
                                 "tokenizer_config.json")
        parser.add_argument("--served-model-name", default="kvroute-test-model")
