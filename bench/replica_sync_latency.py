"""How long a replica-sync record takes from one router replica to another (docs/replica-sync.md).

Starts a throwaway ``redis-server`` on loopback, subscribes one client to the replica-sync
channel and publishes ``--records`` messages from another, one at a time (``--gap-ms`` apart),
each carrying one dispatch record of ``--blocks`` block hashes — the wire format and Redis
commands the router uses. Reported: the time from the publish call until the subscriber has
decoded the message (p50 / p99 / max) and the payload size. On one machine, so it is Redis and
the two clients' event loops, not a network; on a cluster add about one round trip to Redis.

Run::

    python bench/replica_sync_latency.py --records 500 --blocks 100
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio
from kvroute_cli.localredis import start_redis
from kvroute_router.replicasync.sync import DEFAULT_CHANNEL
from kvroute_router.replicasync.wire import DispatchRecord, decode, encode


async def measure(port: int, records: int, blocks: int, gap_s: float) -> tuple[list[float], int]:
    publisher = redis.asyncio.Redis(port=port)
    subscriber = redis.asyncio.Redis(port=port)
    pubsub: Any = subscriber.pubsub(ignore_subscribe_messages=True)  # aclose is untyped
    await pubsub.subscribe(DEFAULT_CHANNEL)
    payload = encode(bytes(16), [DispatchRecord("default/pool", "engine-3",
                                                tuple(range(blocks)))])
    delays: list[float] = []
    try:
        for _ in range(records):
            started = time.perf_counter()
            await publisher.publish(DEFAULT_CHANNEL, payload)
            message = None
            while message is None:
                message = await pubsub.get_message(timeout=1.0)
            decode(message["data"])
            delays.append(time.perf_counter() - started)
            await asyncio.sleep(gap_s)
    finally:
        await pubsub.aclose()
        await publisher.aclose()
        await subscriber.aclose()
    return delays, len(payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--blocks", type=int, default=100,
                        help="block hashes per record (a 1.2k-token question: ~75-100)")
    parser.add_argument("--gap-ms", type=float, default=2.0)
    args = parser.parse_args()
    process, port = start_redis(Path(tempfile.mkdtemp(prefix="kvroute-sync-")))
    try:
        delays, size = asyncio.run(measure(port, args.records, args.blocks, args.gap_ms / 1000))
    finally:
        process.terminate()
        process.wait(timeout=10)
    delays.sort()

    def at(q: float) -> float:
        return 1000 * delays[min(len(delays) - 1, int(q * len(delays)))]

    print(f"{len(delays)} records of {args.blocks} blocks ({size} bytes): publish -> decoded "
          f"p50 {at(0.5):.3f} ms, p99 {at(0.99):.3f} ms, max {1000 * delays[-1]:.3f} ms")


if __name__ == "__main__":
    main()
