"""The subscriber shares the router's event loop: a 20k-batch replay (an engine with a full
replay buffer, a router restart) must not block it. A publisher in its own thread (so its work
is not the test loop's) serves vLLM's replay protocol on loopback; a ticking task measures the
loop's longest stall while the subscriber rebuilds the index. A stall is measured in the loop
thread's CPU time between two ticks (``time.thread_time``): on a shared, overloaded machine
wall-clock gaps also count the time the process waited for a core. The bound is a generous
hang detector (the replay ran ~6 s in one piece before it was sliced), not a timing
threshold."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
import zmq
import zmq.asyncio
from kvroute_router.kvevents.hashing import BlockHashConfig, BlockHasher
from kvroute_router.kvevents.index import PrefixIndex
from kvroute_router.kvevents.metrics import KVEventMetrics
from kvroute_router.kvevents.subscriber import (
    KVEventSource,
    KVEventSubscriber,
    SubscriberSettings,
)

from .test_subscriber import BLOCK, TOPIC, free_port, stored

BATCHES = 20_000
STALL_BOUND_S = 0.25


class ThreadedPublisher:
    """PUB (silent) + ROUTER replay on loopback, served from a thread with plain ZMQ."""

    def __init__(self, buffer: list[tuple[int, bytes]]) -> None:
        self.pub_port, self.replay_port = free_port(), free_port()
        self.buffer = buffer
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("publisher thread did not start")

    def _serve(self) -> None:
        pub = self._ctx.socket(zmq.PUB)
        pub.bind(f"tcp://127.0.0.1:{self.pub_port}")
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.SNDHWM, 0)  # never drop a replay batch
        router.bind(f"tcp://127.0.0.1:{self.replay_port}")
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not router.poll(50):
                    continue
                client, _, start = router.recv_multipart()
                first = int.from_bytes(start, "big")
                for seq, payload in self.buffer:
                    if seq >= first:
                        router.send_multipart([client, b"", TOPIC, seq.to_bytes(8, "big"),
                                               payload])
                router.send_multipart([client, b"", b"", (-1).to_bytes(8, "big", signed=True),
                                       b""])
        finally:
            pub.close(linger=0)
            router.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._ctx.destroy(linger=0)


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


async def test_a_20k_batch_replay_never_blocks_the_event_loop(
        ctx: zmq.asyncio.Context) -> None:
    hasher = BlockHasher(BlockHashConfig(block_size=BLOCK))
    buffer = [(seq, msgspec.msgpack.encode(
        [time.time(), [stored(hasher, [seq * 8 + i for i in range(8)])], 0]))
        for seq in range(BATCHES)]
    publisher = ThreadedPublisher(buffer)
    index = PrefixIndex()
    subscriber = KVEventSubscriber(
        KVEventSource("engine-0", f"tcp://127.0.0.1:{publisher.pub_port}",
                      f"tcp://127.0.0.1:{publisher.replay_port}"),
        index, BlockHasher(BlockHashConfig(BLOCK)), KVEventMetrics(), context=ctx,
        settings=SubscriberSettings(replay_timeout_s=60.0, idle_poll_s=0.05))
    longest = longest_wall = 0.0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal longest, longest_wall
        while not done.is_set():
            before, before_wall = time.thread_time(), time.perf_counter()
            await asyncio.sleep(0.001)
            longest = max(longest, time.thread_time() - before)
            longest_wall = max(longest_wall, time.perf_counter() - before_wall)

    ticker = asyncio.create_task(tick())
    task = asyncio.create_task(subscriber.run())
    try:
        deadline = time.monotonic() + 120
        while subscriber.status.last_seq != BATCHES - 1:
            assert time.monotonic() < deadline, "the replay did not complete"
            await asyncio.sleep(0.05)
        done.set()
        await ticker
        assert index.block_count("engine-0") == 2 * BATCHES
        print(f"20k-batch replay: longest event-loop stall {longest * 1000:.1f} ms CPU, "
              f"{longest_wall * 1000:.1f} ms wall")
        assert longest < STALL_BOUND_S, f"the event loop ran {longest:.3f} s CPU without yielding"
    finally:
        done.set()
        subscriber.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        publisher.close()
