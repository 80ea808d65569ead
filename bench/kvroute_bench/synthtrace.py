"""Synthetic traces in the Mooncake format, for when the published traces cannot be fetched.

The Mooncake FAST'25 traces (``conversation_trace.jsonl``, ``toolagent_trace.jsonl``,
in the FAST'25 trace release of github.com/kvcache-ai/Mooncake) are one hour of Kimi's production
requests, one JSON object per line: ``timestamp`` (ms), ``input_length``, ``output_length``
and ``hash_ids`` (one id per 512-token block of the prompt; equal ids are equal content, so
requests that share a prefix share its leading ids). No text is published. ``mooncake_like``
writes a trace with the same fields whose statistics follow the published description:

============  ==========  ================  =================  ==============================
kind          requests/h  mean input (tok)  mean output (tok)  block reuse (infinite cache)
============  ==========  ================  =================  ==============================
conversation  12,031      12,035            343                ~40 %
toolagent     23,608      8,596             182                ~59 %
============  ==========  ================  =================  ==============================

(the counts are those of the released files; lengths and reuse as the Mooncake paper's trace
table gives them). How the reuse arises is this module's model, not Mooncake's data: a
request either opens a **session** — one of ``roots`` shared prefixes (a system prompt or a
tool-schema block, Zipf-popular) followed by new blocks — or continues one of the
``active_sessions`` open ones, whose new prompt is the previous prompt, its answer and a new
turn (so the previous prompt's ids are its prefix). Sessions end with ``end_p`` per turn or
when the next turn would pass ``max_input`` tokens. Arrivals are Poisson at ``rate`` req/s.
Lengths are log-normal; ``TraceStats`` measures what a generated trace really has, and the
unit tests hold each kind to its targets.

Run ``python -m kvroute_bench.synthtrace --kind toolagent --requests 400 --out FILE`` and
replay it with ``kvroute bench --trace FILE`` exactly as the real file would be replayed.
Only tiny traces ship with kvroute (``bench/traces/``); generated ones are reproducible from
their seed.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvroute_bench.traces import MOONCAKE_BLOCK_TOKENS


@dataclass(frozen=True)
class SynthKind:
    """The knobs of one trace kind (defaults tuned so ``TraceStats`` meets the targets)."""

    roots: int  # distinct shared prefixes (system prompts, tool schemas)
    root_blocks: float  # median shared-prefix length, blocks
    zipf: float  # popularity exponent over roots
    first_blocks: float  # median new blocks in a session's first request
    turn_blocks: float  # median new blocks a further turn adds (tool output, user turn)
    active_sessions: int  # sessions open at once
    end_p: float  # chance a session ends after each turn
    output_median: float  # output tokens, log-normal median
    output_sigma: float
    max_input: int  # a session ends before its prompt would pass this many tokens
    # Targets from the published description (checked by the tests, printed by main()).
    target_input: float
    target_output: float
    target_reuse: float


KINDS: dict[str, SynthKind] = {
    "toolagent": SynthKind(roots=12, root_blocks=4.0, zipf=1.1, first_blocks=6.0,
                           turn_blocks=5.0, active_sessions=40, end_p=0.45,
                           output_median=120.0, output_sigma=0.9, max_input=30_000,
                           target_input=8596, target_output=182, target_reuse=0.59),
    "conversation": SynthKind(roots=6, root_blocks=2.0, zipf=1.0, first_blocks=14.0,
                              turn_blocks=8.0, active_sessions=60, end_p=0.55,
                              output_median=220.0, output_sigma=0.95, max_input=30_000,
                              target_input=12035, target_output=343, target_reuse=0.40),
}


@dataclass(frozen=True)
class TraceStats:
    """What a Mooncake-format trace holds: mean lengths and the share of its blocks that an
    infinite cache would already hold (each block id counted from its second use on)."""

    requests: int
    mean_input: float
    mean_output: float
    block_reuse: float
    rate: float  # requests per second over the trace's span


def stats(rows: Sequence[dict[str, Any]]) -> TraceStats:
    seen: set[int] = set()
    total = reused = 0
    for row in rows:
        for block in row["hash_ids"]:
            total += 1
            if block in seen:
                reused += 1
            seen.add(block)
    span_s = (rows[-1]["timestamp"] - rows[0]["timestamp"]) / 1000.0 if rows else 0.0
    n = len(rows)
    return TraceStats(
        requests=n,
        mean_input=sum(r["input_length"] for r in rows) / n if n else math.nan,
        mean_output=sum(r["output_length"] for r in rows) / n if n else math.nan,
        block_reuse=reused / total if total else math.nan,
        rate=(n - 1) / span_s if span_s > 0 else math.nan)


def mooncake_like(kind: str = "toolagent", requests: int = 400, rate: float = 1.0,
                  seed: int = 0) -> list[dict[str, Any]]:
    """A deterministic trace of ``requests`` Mooncake-format rows (``timestamp`` ms,
    ``input_length``, ``output_length``, ``hash_ids``) of the named kind at ``rate`` req/s.

    The same arguments give the same rows. Block ids 0.. are the roots' blocks; every other
    block gets the next unused id, so a shared prefix is exactly a shared run of leading ids,
    as in the published traces.
    """
    spec = KINDS[kind]
    rng = np.random.default_rng([seed, 0x4D6F6F6E])  # "Moon"
    next_id = 0

    def fresh(count: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + count))
        next_id += count
        return ids

    def lognormal_blocks(median: float) -> int:
        return max(1, round(float(rng.lognormal(math.log(median), 0.6))))

    roots = [fresh(lognormal_blocks(spec.root_blocks)) for _ in range(spec.roots)]
    weights = np.array([1.0 / (i + 1) ** spec.zipf for i in range(spec.roots)])
    weights /= weights.sum()
    max_blocks = spec.max_input // MOONCAKE_BLOCK_TOKENS

    def open_session() -> list[int]:
        root = roots[int(rng.choice(spec.roots, p=weights))]
        return root + fresh(lognormal_blocks(spec.first_blocks))

    # Each open session holds the ids of its last prompt and of its last answer, or nothing
    # before its first request.
    sessions: list[tuple[list[int], int] | None] = [None] * spec.active_sessions
    rows: list[dict[str, Any]] = []
    at_s = 0.0
    for _ in range(requests):
        at_s += float(rng.exponential(1.0 / rate))
        slot = int(rng.integers(spec.active_sessions))
        state = sessions[slot]
        ids: list[int] | None = None
        if state is not None and rng.random() >= spec.end_p:
            previous, answer_blocks = state
            ids = previous + fresh(answer_blocks + lognormal_blocks(spec.turn_blocks))
            if len(ids) > max_blocks:
                ids = None
        if ids is None:
            ids = open_session()[:max_blocks]
        # The last block is partly filled, as in the published traces.
        length = len(ids) * MOONCAKE_BLOCK_TOKENS - int(rng.integers(MOONCAKE_BLOCK_TOKENS))
        output = max(1, round(float(rng.lognormal(math.log(spec.output_median),
                                                  spec.output_sigma))))
        output = min(output, 8 * round(spec.target_output))
        sessions[slot] = (ids, math.ceil(output / MOONCAKE_BLOCK_TOKENS))
        rows.append({"timestamp": round(at_s * 1000), "input_length": length,
                     "output_length": output, "hash_ids": ids})
    return rows


def write(rows: Sequence[dict[str, Any]], path: Path) -> None:
    path.write_text("".join(json.dumps(r, separators=(", ", ": ")) + "\n" for r in rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kind", choices=sorted(KINDS), default="toolagent")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rate", type=float, default=1.0, help="requests/s (Poisson)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = mooncake_like(args.kind, args.requests, args.rate, args.seed)
    write(rows, args.out)
    got = stats(rows)
    spec = KINDS[args.kind]
    print(f"{args.out}: {got.requests} requests at {got.rate:.2f} req/s; mean input "
          f"{got.mean_input:.0f} tokens (target {spec.target_input:.0f}), mean output "
          f"{got.mean_output:.0f} (target {spec.target_output:.0f}), block reuse "
          f"{got.block_reuse:.0%} (target {spec.target_reuse:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
