"""The subscriber against a real ZMQ publisher on loopback speaking vLLM's KV-event protocol.

``LoopbackPublisher`` binds a PUB and a ROUTER socket the way vLLM's ``ZmqEventPublisher``
does, keeps a replay buffer, and can skip sending a batch live (a gap) or start again at
sequence 0 (an engine restart). Every test waits on conditions with a deadline, not on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

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

BLOCK = 4
TOPIC = b"kv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LoopbackPublisher:
    """vLLM's publishing protocol on loopback: PUB for live batches, ROUTER for replay."""

    def __init__(self, ctx: zmq.asyncio.Context, pub_port: int, replay_port: int,
                 topic: bytes = TOPIC) -> None:
        self.topic = topic
        self.pub = ctx.socket(zmq.PUB)
        self.pub.bind(f"tcp://127.0.0.1:{pub_port}")
        self.router = ctx.socket(zmq.ROUTER)
        try:
            self.router.bind(f"tcp://127.0.0.1:{replay_port}")
        except zmq.ZMQError:
            self.pub.close(linger=0)
            self.router.close(linger=0)
            raise
        self.buffer: list[tuple[int, bytes]] = []
        self.seq = 0
        self.replay_task = asyncio.create_task(self._serve_replay())

    async def _serve_replay(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            first = int.from_bytes(start, "big")
            for seq, payload in self.buffer:
                if seq >= first:
                    await self.router.send_multipart(
                        [client, b"", self.topic, seq.to_bytes(8, "big"), payload])
            await self.router.send_multipart(
                [client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""])

    async def publish(self, events: list[dict[str, Any]], *, live: bool = True) -> int:
        payload = msgspec.msgpack.encode([time.time(), events, 0])
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        if live:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    async def close(self) -> None:
        self.replay_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.replay_task
        self.pub.close(linger=0)
        self.router.close(linger=0)


def stored(hasher: BlockHasher, tokens: list[int], **extra: Any) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": hasher.block_hashes(tokens),
            "parent_block_hash": None, "token_ids": tokens, "block_size": BLOCK,
            "lora_id": None, "medium": "GPU", "lora_name": None, **extra}


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


class Rig:
    def __init__(self, ctx: zmq.asyncio.Context, *, router_seed: str = "vllm-none-hash",
                 queue_size: int = 4096, publisher_topic: bytes = TOPIC,
                 publisher: type[LoopbackPublisher] | None = None, **settings: Any) -> None:
        self.ctx = ctx
        self.pub_port, self.replay_port = free_port(), free_port()
        self.hasher = BlockHasher(BlockHashConfig(block_size=BLOCK))
        self.index = PrefixIndex()
        self.metrics = KVEventMetrics()
        source = KVEventSource("engine-0", f"tcp://127.0.0.1:{self.pub_port}",
                               f"tcp://127.0.0.1:{self.replay_port}")
        self.subscriber = KVEventSubscriber(
            source, self.index, BlockHasher(BlockHashConfig(BLOCK, seed=router_seed)),
            self.metrics, context=ctx,
            settings=SubscriberSettings(**{"queue_size": queue_size, "replay_timeout_s": 3.0,
                                           "idle_poll_s": 0.05, "self_check_sample_every": 1,
                                           **settings}))
        self.publisher_class = publisher or LoopbackPublisher
        self.publisher_topic = publisher_topic
        self.publisher = self.publisher_class(ctx, self.pub_port, self.replay_port,
                                              publisher_topic)
        self.task = asyncio.create_task(self.subscriber.run())

    async def restart_publisher(self) -> None:
        """A new publisher on the same ports. ZMQ closes sockets in its I/O thread, so the old
        one may hold the port a moment longer: retry the bind for a bounded time."""
        await self.publisher.close()
        deadline = time.monotonic() + 10.0
        while True:
            try:
                self.publisher = self.publisher_class(self.ctx, self.pub_port,
                                                      self.replay_port, self.publisher_topic)
                return
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        self.subscriber.stop()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.publisher.close()

    def matched(self, tokens: list[int]) -> int:
        return self.index.match(self.hasher.block_hashes(tokens))["engine-0"]

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


async def publish_until_seen(rig: Rig, tokens: list[int], blocks: int) -> None:
    """The first live batches may race the SUB connect (slow joiner); replay covers them."""
    await rig.publisher.publish([stored(rig.hasher, tokens)])
    await eventually(lambda: rig.matched(tokens) == blocks, "the stored blocks in the index")


async def test_follows_stores_removals_and_clears(ctx: zmq.asyncio.Context) -> None:
    rig = Rig(ctx)
    try:
        await eventually(lambda: rig.subscriber.status.connected, "connection")
        tokens = list(range(100, 112))
        await publish_until_seen(rig, tokens, 3)
        assert rig.subscriber.status.trustworthy
        hashes = rig.hasher.block_hashes(tokens)
        await rig.publisher.publish([{"type": "BlockRemoved", "block_hashes": hashes[1:2],
                                      "medium": "GPU"}])
        await eventually(lambda: rig.matched(tokens) == 1, "the removal")
        await rig.publisher.publish([{"type": "AllBlocksCleared"}])
        await eventually(lambda: rig.index.block_count("engine-0") == 0, "the clear")
        assert rig.subscriber.status.hash_check.state == "ok"
        assert rig.metric("kvroute_kv_events_hash_checks_total", endpoint="engine-0",
                          result="match") >= 1
    finally:
        await rig.close()


@pytest.mark.parametrize("topic", [b"", b"kv", b"kv@pool-7f9c-0"],
                         ids=["vllm-default", "kv", "operator-pod"])
async def test_live_batches_arrive_under_any_topic(ctx: zmq.asyncio.Context,
                                                   topic: bytes) -> None:
    """vLLM publishes under its default topic ``""`` unless told otherwise, the operator's
    engines under ``kv@<pod>``: the default source takes every topic live, not only through
    the replay (a subscription to ``kv`` dropped every live batch of a default engine)."""
    rig = Rig(ctx, publisher_topic=topic)
    try:
        await eventually(lambda: rig.subscriber.status.connected, "connection")
        tokens = list(range(200, 208))
        await publish_until_seen(rig, tokens, 2)
        def live() -> float:
            return rig.metric("kvroute_kv_events_messages_received_total",
                              endpoint="engine-0", path="live")

        deadline = time.monotonic() + 15.0  # a deadline, not a timing: one live batch suffices
        number = 0
        while live() < 1 and time.monotonic() < deadline:
            await rig.publisher.publish([stored(rig.hasher, [300 + number % 50] * BLOCK)])
            number += 1
            await asyncio.sleep(0.1)
        assert live() >= 1, f"no batch of {number} under topic {topic!r} arrived live"
    finally:
        await rig.close()


async def test_gap_is_filled_from_replay(ctx: zmq.asyncio.Context) -> None:
    rig = Rig(ctx)
    try:
        await eventually(lambda: rig.subscriber.status.connected, "connection")
        first = list(range(10, 18))
        await publish_until_seen(rig, first, 2)
        missed = list(range(20, 28))
        await rig.publisher.publish([stored(rig.hasher, missed)], live=False)
        after = list(range(30, 38))
        await rig.publisher.publish([stored(rig.hasher, after)])
        await eventually(lambda: rig.matched(after) == 2, "the batch after the gap")
        assert rig.matched(missed) == 2
        assert rig.subscriber.status.gaps >= 1
        assert rig.subscriber.status.last_seq == rig.publisher.seq - 1
    finally:
        await rig.close()


async def test_restart_drops_the_endpoints_blocks(ctx: zmq.asyncio.Context) -> None:
    rig = Rig(ctx)
    try:
        await eventually(lambda: rig.subscriber.status.connected, "connection")
        old = list(range(40, 48))
        await publish_until_seen(rig, old, 2)
        for number in range(3):
            await rig.publisher.publish([stored(rig.hasher, [number] * BLOCK)])
        await eventually(lambda: rig.subscriber.status.last_seq == 3, "all old batches")
        await rig.restart_publisher()
        new = list(range(50, 58))
        await eventually(lambda: rig.subscriber.status.restarts >= 1
                         or rig.subscriber.status.connected, "reconnection")
        await rig.publisher.publish([stored(rig.hasher, new)])
        await eventually(lambda: rig.matched(new) == 2, "the new engine's blocks")
        await eventually(lambda: rig.matched(old) == 0, "the old engine's blocks dropped")
        assert rig.subscriber.status.restarts >= 1
        assert rig.metric("kvroute_kv_events_engine_restarts_total", endpoint="engine-0") >= 1
    finally:
        await rig.close()


async def test_wrong_seed_raises_the_hash_alarm(ctx: zmq.asyncio.Context) -> None:
    rig = Rig(ctx, router_seed="not-the-engines-seed")
    try:
        await eventually(lambda: rig.subscriber.status.connected, "connection")
        await rig.publisher.publish([stored(rig.hasher, list(range(8)))])
        await eventually(lambda: rig.subscriber.status.hash_check.state == "mismatch",
                         "the mismatch alarm")
        assert not rig.subscriber.status.trustworthy
        assert rig.metric("kvroute_kv_events_hash_mismatch_total", endpoint="engine-0") >= 1
        detail = rig.subscriber.status.hash_check.last_mismatch
        assert detail is not None and "seed" in detail["likely_cause"]
    finally:
        await rig.close()


def test_the_next_batch_is_applied_on_receipt_only_when_the_applier_is_idle() -> None:
    """The receiver hands a batch over; in sequence, with the applier parked on its empty
    queue and no resync due, it is applied there and then (no task wake-up per batch);
    anything else goes through the queue, in order, to the applier."""
    hasher = BlockHasher(BlockHashConfig(block_size=BLOCK))
    subscriber = KVEventSubscriber(KVEventSource("engine-0", "tcp://127.0.0.1:1"),
                                   PrefixIndex(), None, KVEventMetrics())

    def frames(seq: int, tokens: list[int]) -> list[bytes]:
        payload = msgspec.msgpack.encode([time.time(), [stored(hasher, tokens)], 0])
        return [TOPIC, seq.to_bytes(8, "big"), payload]

    subscriber.status.last_seq = 4
    subscriber._resync_needed = False
    subscriber._parked = True
    subscriber._deliver(frames(5, [1, 2, 3, 4]))
    assert subscriber.status.last_seq == 5 and subscriber._queue.empty()
    assert subscriber.index.match(hasher.block_hashes([1, 2, 3, 4]))["engine-0"] == 1
    subscriber._deliver(frames(7, [5, 6, 7, 8]))  # a gap: the applier's replay handles it
    assert subscriber.status.last_seq == 5 and subscriber._queue.qsize() == 1
    subscriber._deliver(frames(6, [9, 10, 11, 12]))  # in sequence, but one is queued before
    assert subscriber.status.last_seq == 5 and subscriber._queue.qsize() == 2
    subscriber._queue = asyncio.Queue()
    subscriber._parked = False  # the applier is busy (a replay): it must not be overtaken
    subscriber._deliver(frames(6, [9, 10, 11, 12]))
    assert subscriber.status.last_seq == 5 and subscriber._queue.qsize() == 1
    subscriber._queue = asyncio.Queue()
    subscriber._parked = True
    subscriber._resync_needed = True  # e.g. reconnected: a replay comes first
    subscriber._deliver(frames(6, [9, 10, 11, 12]))
    assert subscriber.status.last_seq == 5 and subscriber._queue.qsize() == 1


# -- closing never hangs (issue 12) ---------------------------------------------------------
async def test_a_cancel_that_arrives_with_a_batch_still_ends_the_apply_loop(
        ctx: zmq.asyncio.Context) -> None:
    """The batch and the cancellation land in the same loop iteration.

    On Python 3.11, ``asyncio.wait_for`` around ``queue.get()`` returns the batch and swallows
    the cancellation; the loop then polled forever and the owner's ``await task`` never returned
    (the 600 s hang of the e2e restart test). The apply loop must end all the same.
    """
    source = KVEventSource("engine-0", f"tcp://127.0.0.1:{free_port()}")
    subscriber = KVEventSubscriber(source, PrefixIndex(), None, KVEventMetrics(), context=ctx,
                                   settings=SubscriberSettings(idle_poll_s=30.0))
    subscriber.status.connected = True
    subscriber._resync_needed = False  # replay is not what this test is about
    task = asyncio.create_task(subscriber._apply_loop())
    await asyncio.sleep(0.05)  # the loop is now waiting on the queue
    assert not task.done()
    subscriber.stop()
    subscriber._queue.put_nowait((0, b"\x93"))  # wakes the waiting get() ...
    task.cancel()  # ... and cancels, before the loop had a chance to run
    done, _ = await asyncio.wait({task}, timeout=5.0)
    if not done:
        task.cancel()
        raise AssertionError("the apply loop swallowed its cancellation and kept polling")


async def test_restart_then_close_returns_promptly(ctx: zmq.asyncio.Context) -> None:
    """An engine restarts (new sequence), the subscriber follows it, then the pool closes:
    close returns within the stop bound."""
    from kvroute_router.kvevents.hub import PoolKVEvents

    pub_port, replay_port = free_port(), free_port()
    hasher = BlockHasher(BlockHashConfig(block_size=BLOCK))
    events = PoolKVEvents(BlockHashConfig(block_size=BLOCK), context=ctx,
                          settings=SubscriberSettings(replay_timeout_s=3.0, idle_poll_s=0.05))
    publisher = LoopbackPublisher(ctx, pub_port, replay_port)
    await events.set_sources([KVEventSource("engine-0", f"tcp://127.0.0.1:{pub_port}",
                                            f"tcp://127.0.0.1:{replay_port}")])
    try:
        await eventually(lambda: events.trustworthy("engine-0"), "the subscriber in sync")
        for number in range(3):
            await publisher.publish([stored(hasher, [number] * BLOCK)])
        status = events.status("engine-0")
        assert status is not None
        await eventually(lambda: status.last_seq == 2, "the first engine's batches")
        await publisher.close()
        deadline = time.monotonic() + 10.0
        while True:  # ZMQ releases the ports asynchronously
            try:
                publisher = LoopbackPublisher(ctx, pub_port, replay_port)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        await publisher.publish([stored(hasher, list(range(60, 68)))])
        await eventually(lambda: status.restarts >= 1 and status.trustworthy,
                         "the restart followed")
        # Keep batches flowing while closing: the race of the first test, on the real path.
        publishing = asyncio.create_task(_publish_forever(publisher, hasher))
        try:
            async with asyncio.timeout(5.0):
                await events.aclose()
        except TimeoutError:
            raise AssertionError("PoolKVEvents.aclose() did not return within 5 s") from None
        finally:
            publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publishing
        assert events.statuses() == []
    finally:
        await events.aclose()
        await publisher.close()


async def _publish_forever(publisher: LoopbackPublisher, hasher: BlockHasher) -> None:
    for number in range(100_000):
        await publisher.publish([stored(hasher, [number % 1000] * BLOCK)])
        await asyncio.sleep(0)


async def test_close_abandons_a_subscriber_that_will_not_stop(
        ctx: zmq.asyncio.Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """A subscriber task that outlives its cancellation (whatever the cause) is left behind
    with its sockets closed: close still returns."""
    from kvroute_router.kvevents.hub import PoolKVEvents

    release = asyncio.Event()

    async def stubborn(self: KVEventSubscriber) -> None:
        sock = self._open_socket(zmq.SUB)
        sock.connect(self.source.events_endpoint)
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(1.0)

    monkeypatch.setattr(KVEventSubscriber, "run", stubborn)
    events = PoolKVEvents(BlockHashConfig(block_size=BLOCK), context=ctx, stop_timeout_s=0.2)
    await events.set_sources([KVEventSource("engine-0", f"tcp://127.0.0.1:{free_port()}")])
    subscriber = events._subscribers["engine-0"][0]
    await asyncio.sleep(0.05)
    assert subscriber._sockets
    try:
        async with asyncio.timeout(5.0):
            await events.aclose()
    except TimeoutError:
        raise AssertionError("close waited on a task that ignores cancellation") from None
    finally:
        release.set()
    assert not subscriber._sockets
