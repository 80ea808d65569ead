"""Benchmark: the router's CPU to take in KV events, per batch and per block.

Every engine publishes a batch when blocks are stored or evicted, and every router replica
subscribes to every engine, so a replica's event work grows with the fleet's prefill rate, not
with its own share of requests. This measures the subscriber's apply path on one batch — decode
(msgpack), the uint64 form of the block hashes, the prefix index's update, the metrics — in CPU
time of this process, without sockets (the ZMQ receive is a per-batch cost of libzmq, not per
block).

Each batch is shaped as the emulator publishes for one request: one ``BlockStored`` of
``--blocks`` new blocks chained to a parent (with their token ids, ``--block-size`` each) and
one ``BlockRemoved`` of as many evicted blocks, so the index stays at the engine's size. Each
size is reported as the median and the fastest of ``--rounds`` rounds (CPU µs per batch): on a
shared VM without hardware counters, compare versions by interleaved runs. Token
ids are drawn below ``--vocab`` (256: the byte-level test model; 128,000: a Llama-3-sized
vocabulary, whose ids take 3 bytes in msgpack). The hash self-check is off (``--self-check``
turns it on: it checks every event until 32 are verified and one in 16 after; these events
chain to parents it never computed, so none verifies and each costs an attempt — since round
14 a lookup of the parent, before that the decoding of its token ids too).

    python bench/kv_ingest.py [--blocks 16,75,450] [--vocab 256,128000] [--batches 300]
                              [--rounds 5] [--self-check] [--json FILE]

``--receive N`` measures the whole way in instead (round 15 of ``router-cpu.md``): N engines'
PUB sockets in a publisher process, each batch sent paced at ``--rate`` batches a second in
all, and N subscribers of one pool (one :class:`~kvroute_router.kvevents.receiver.EventReceiver`)
on uvloop in this process, connected over loopback. Reported: CPU µs per batch of this process
(minus its idle rate, measured after), of its event-loop thread, and of the apply path alone.

    python bench/kv_ingest.py --receive 16 --rate 1000 --batches 3000 --blocks 16 --vocab 128000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
from kvroute_router.kvevents.hashing import BlockHashConfig, BlockHasher
from kvroute_router.kvevents.index import PrefixIndex
from kvroute_router.kvevents.metrics import KVEventMetrics
from kvroute_router.kvevents.subscriber import KVEventSource, KVEventSubscriber
from prometheus_client import CollectorRegistry


def batches(count: int, blocks: int, block_size: int, vocab: int, seed: int) -> list[bytes]:
    """``count`` payloads of one chained ``BlockStored`` and one ``BlockRemoved`` each, the
    removed blocks being those stored eight batches before (an engine at capacity)."""
    rng = random.Random(seed)
    stored: list[list[int]] = []
    payloads = []
    for _ in range(count):
        hashes = [rng.getrandbits(64) for _ in range(blocks)]
        stored.append(hashes)
        removed = stored.pop(0) if len(stored) > 8 else []
        events: list[dict[str, Any]] = [
            {"type": "BlockStored", "block_hashes": hashes,
             "parent_block_hash": rng.getrandbits(64),
             "token_ids": [rng.randrange(vocab) for _ in range(blocks * block_size)],
             "block_size": block_size, "lora_id": None, "medium": "GPU", "lora_name": None,
             "extra_keys": [None] * blocks, "group_idx": 0,
             "kv_cache_spec_kind": "full_attention"}]
        if removed:
            events.append({"type": "BlockRemoved", "block_hashes": removed, "medium": "GPU"})
        payloads.append(msgspec.msgpack.encode([time.time(), events, 0]))
    return payloads


def subscriber(block_size: int, self_check: bool) -> KVEventSubscriber:
    """engine-0's subscriber (not connected: batches are handed to its apply path) over an
    index that knows 16 endpoints."""
    index = PrefixIndex()
    hasher = BlockHasher(BlockHashConfig(block_size)) if self_check else None
    for other in range(1, 16):
        index.add_endpoint(f"engine-{other}:8000")
    return KVEventSubscriber(KVEventSource("engine-0:8000", "tcp://127.0.0.1:1"), index, hasher,
                             KVEventMetrics(CollectorRegistry()))


def measure(payloads: list[bytes], block_size: int, self_check: bool, rounds: int
            ) -> list[float]:
    """CPU µs per batch, one value per round (each round applies every payload once)."""
    follower = subscriber(block_size, self_check)
    seq = 0
    per_round = []
    for _ in range(rounds + 1):  # the first round warms the index up: not reported
        started = time.process_time()
        for payload in payloads:
            follower._apply(seq, payload, "live")
            seq += 1
        per_round.append((time.process_time() - started) / len(payloads) * 1e6)
    return per_round[1:]


PUBLISHER = r"""
import pickle, sys, time, zmq
base, engines, rate, path = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
with open(path, "rb") as f:
    payloads = pickle.load(f)
ctx = zmq.Context()
socks = []
for k in range(engines):
    s = ctx.socket(zmq.PUB)
    s.setsockopt(zmq.SNDHWM, 0)
    s.bind(f"tcp://127.0.0.1:{base + k}")
    socks.append(s)
time.sleep(1.5)  # the subscribers join (ZMQ's slow joiner)
t0 = time.monotonic()
for i, payload in enumerate(payloads):
    delay = t0 + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    socks[i % engines].send_multipart([b"", (i // engines).to_bytes(8, "big"), payload])
time.sleep(0.5)
"""


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _receive(total: int, engines: int, base_port: int) -> dict[str, float]:
    """Follow the publisher's engines until ``total`` batches were applied."""
    from kvroute_router.kvevents.receiver import EventReceiver

    index = PrefixIndex()
    receiver = EventReceiver()
    followers = [KVEventSubscriber(
        KVEventSource(f"engine-{k}:8000", f"tcp://127.0.0.1:{base_port + k}"), index, None,
        KVEventMetrics(CollectorRegistry()), receiver=receiver) for k in range(engines)]
    tasks = [asyncio.create_task(follower.run()) for follower in followers]
    try:
        def applied() -> int:
            return sum(follower.status.batches_applied for follower in followers)

        deadline = time.monotonic() + 30
        # Polling a counter the followers update (no event to wait on), bounded in time.
        while applied() < engines and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.001)  # the first batch of each engine (after its resync)
        c0, m0, t0, b0 = _process_cpu(), time.thread_time(), time.monotonic(), applied()
        while applied() < total and time.monotonic() - t0 < 120:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        c1, m1, t1, b1 = _process_cpu(), time.thread_time(), time.monotonic(), applied()
        await asyncio.sleep(0.2)
        i0, it0 = _process_cpu(), time.monotonic()
        await asyncio.sleep(2.0)
        idle = (_process_cpu() - i0) / (time.monotonic() - it0)
    finally:
        for follower in followers:
            follower.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    count = max(1, b1 - b0)
    return {"batches": b1 - b0,
            "us_per_batch": ((c1 - c0) - idle * (t1 - t0)) / count * 1e6,
            "loop_thread_us_per_batch": (m1 - m0) / count * 1e6, "idle_cores": idle}


def measure_receive(args: argparse.Namespace) -> None:
    import uvloop

    blocks, vocab = int(args.blocks.split(",")[0]), int(args.vocab.split(",")[-1])
    payloads = batches(args.batches, blocks, args.block_size, vocab, seed=blocks)
    apply_only = min(measure(payloads, args.block_size, False, args.rounds))
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
        pickle.dump(payloads, f)
    publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(args.base_port),
                                  str(args.receive), str(args.rate), f.name])
    try:
        uvloop.install()
        row = asyncio.run(_receive(len(payloads), args.receive, args.base_port))
    finally:
        publisher.wait(timeout=60)
        Path(f.name).unlink()
    row.update({"engines": args.receive, "rate": args.rate, "blocks": blocks, "vocab": vocab,
                "apply_only_us_per_batch": apply_only})
    print(f"{args.receive} engines, {args.rate:g} batches/s of {blocks} blocks: "
          f"{row['us_per_batch']:.1f} µs of CPU per batch received and applied "
          f"(event-loop thread {row['loop_thread_us_per_batch']:.1f}; apply path alone "
          f"{apply_only:.1f}; {row['batches']:.0f} batches, idle {row['idle_cores']:.4f} cores)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "receive": row}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="16,75,450")
    parser.add_argument("--vocab", default="256,128000")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--self-check", action="store_true")
    parser.add_argument("--json", default="")
    parser.add_argument("--receive", type=int, default=0, metavar="ENGINES",
                        help="measure the sockets, receiver and apply path over loopback with "
                             "this many publishing engines (the first of --blocks, the last "
                             "of --vocab)")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="--receive: batches a second, all engines together")
    parser.add_argument("--base-port", type=int, default=25700,
                        help="--receive: the engines' PUB ports start here")
    args = parser.parse_args()
    if args.receive:
        measure_receive(args)
        return
    rows = []
    print(f"{'blocks':>6} {'vocab':>7} {'µs/batch':>12} {'fastest':>9} {'µs/block':>9}  rounds")
    for vocab in (int(v) for v in args.vocab.split(",")):
        for blocks in (int(b) for b in args.blocks.split(",")):
            payloads = batches(args.batches, blocks, args.block_size, vocab, seed=blocks)
            rounds = measure(payloads, args.block_size, args.self_check, args.rounds)
            median, fastest = statistics.median(rounds), min(rounds)
            per_block = median / (2 * blocks)  # stored + removed (after the first 8 batches)
            rows.append({"blocks": blocks, "vocab": vocab, "us_per_batch": round(median, 1),
                         "us_per_batch_min": round(fastest, 1),
                         "us_per_block": round(per_block, 3),
                         "rounds": [round(r, 1) for r in rounds]})
            print(f"{blocks:>6} {vocab:>7} {median:>12.1f} {fastest:>9.1f} {per_block:>9.3f}  "
                  f"{[round(r) for r in rounds]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
