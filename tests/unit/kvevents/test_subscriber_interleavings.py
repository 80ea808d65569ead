"""The subscriber's gap / replay / apply state machine, driven through hand-ordered frames.

A real ZMQ publisher on loopback (:class:`ScriptedPublisher`, vLLM's protocol) whose replay
socket can be scripted: hold an answer until the test has queued live batches behind it, answer
as of the request or as of the answer, ignore a request (the replay times out), leave a batch
out of an answer (a ROUTER socket silently drops what exceeds its high-water mark), or answer
in the two-frame form ``[seq, payload]`` that vLLM's ``ZmqEventPublisher`` sends (no topic
frame). Each test orders the frames itself and waits on conditions, never on timing; the
settings it shortens (replay timeout, tail check) are the subscriber's, not assertions.

The fault suite saw an engine's index stay one batch short with ``synced: true`` after bursts
of lost batches (issue 16): a replay that failed inside the gap path let the live batch step
over the hole for good, and an incomplete replay answer was applied over its hole.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio
from kvroute_router.kvevents.hashing import BlockHashConfig, BlockHasher
from kvroute_router.kvevents.index import PrefixIndex
from kvroute_router.kvevents.metrics import KVEventMetrics
from kvroute_router.kvevents.subscriber import (
    MAX_HOLE_RETRIES,
    KVEventSource,
    KVEventSubscriber,
)

from .test_subscriber import (
    BLOCK,
    TOPIC,
    LoopbackPublisher,
    Rig,
    eventually,
    publish_until_seen,
    stored,
)

END = (-1).to_bytes(8, "big", signed=True)
ALWAYS = -1


class ScriptedPublisher(LoopbackPublisher):
    """:class:`LoopbackPublisher` whose replay answers follow the test's script."""

    def __init__(self, ctx: zmq.asyncio.Context, pub_port: int, replay_port: int,
                 topic: bytes = TOPIC) -> None:
        super().__init__(ctx, pub_port, replay_port, topic)
        self.requests: list[int] = []
        self.ignore = 0
        self.silent: asyncio.Event | None = None  # ignore every request until set
        self.hold: asyncio.Event | None = None
        self.snapshot_at_answer = False
        self.omit: dict[int, int] = {}  # seq -> how many answers leave it out (ALWAYS: all)
        self.bare = False  # vLLM's two-frame answers: [seq, payload], end [-1, b""]

    async def _serve_replay(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            first = int.from_bytes(start, "big")
            self.requests.append(first)
            if self.ignore or (self.silent is not None and not self.silent.is_set()):
                self.ignore = max(self.ignore - 1, 0)
                continue
            snapshot = list(self.buffer)
            if self.hold is not None:
                await self.hold.wait()
            if self.snapshot_at_answer:
                snapshot = list(self.buffer)
            head = [] if self.bare else [self.topic]
            for seq, payload in snapshot:
                if seq < first:
                    continue
                left = self.omit.get(seq, 0)
                if left:
                    if left > 0:
                        self.omit[seq] = left - 1
                    continue
                await self.router.send_multipart(
                    [client, b"", *head, seq.to_bytes(8, "big"), payload])
            end = [END, b""] if self.bare else [b"", END, b""]
            await self.router.send_multipart([client, b"", *end])


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


def tokens_of(n: int) -> list[int]:
    """Two blocks of their own for batch ``n``."""
    return list(range(1000 + 2 * BLOCK * n, 1000 + 2 * BLOCK * (n + 1)))


async def start(ctx: zmq.asyncio.Context, **settings: Any) -> tuple[Rig, ScriptedPublisher]:
    rig = Rig(ctx, publisher=ScriptedPublisher, **settings)
    await eventually(lambda: rig.subscriber.status.connected, "connection")
    await publish_until_seen(rig, tokens_of(0), 2)  # seq 0
    assert isinstance(rig.publisher, ScriptedPublisher)
    return rig, rig.publisher


async def publish(rig: Rig, n: int, *, live: bool) -> None:
    seq = await rig.publisher.publish([stored(rig.hasher, tokens_of(n))], live=live)
    assert seq == n


def assert_complete(rig: Rig, last: int) -> None:
    status = rig.subscriber.status
    assert status.last_seq == last
    assert [n for n in range(last + 1) if rig.matched(tokens_of(n)) != 2] == []
    assert status.batches_applied == last + 1
    assert rig.index.block_count("engine-0") == 2 * (last + 1)


async def settled(rig: Rig, last: int) -> None:
    await eventually(lambda: rig.subscriber.status.last_seq == last
                     and rig.subscriber.status.synced, f"batch {last} applied, in sync")


@pytest.mark.parametrize("snapshot_at_answer", [False, True], ids=["as-of-request",
                                                                   "as-of-answer"])
async def test_live_batches_queued_behind_a_replay(ctx: zmq.asyncio.Context,
                                                   snapshot_at_answer: bool) -> None:
    """Batch 1 lost → gap at 2 → replay held while 3, 4 (and, past a second loss at 5, 6)
    wait in the live queue; then the answer ends before them (as of the request) or covers
    them (as of the answer). Every batch is applied exactly once."""
    rig, publisher = await start(ctx, replay_timeout_s=60.0)
    try:
        publisher.hold = asyncio.Event()
        publisher.snapshot_at_answer = snapshot_at_answer
        asked = len(publisher.requests)
        await publish(rig, 1, live=False)
        await publish(rig, 2, live=True)
        await eventually(lambda: len(publisher.requests) > asked, "the replay request")
        assert publisher.requests[-1] == 0
        await publish(rig, 3, live=True)
        await publish(rig, 4, live=True)
        await publish(rig, 5, live=False)
        await publish(rig, 6, live=True)
        await eventually(lambda: rig.subscriber._queue.qsize() == 3, "3, 4 and 6 queued")
        assert not rig.subscriber.status.synced  # a gap is open while its replay runs
        publisher.hold.set()
        await settled(rig, 6)
        assert_complete(rig, 6)
        assert rig.subscriber.status.gaps == (1 if snapshot_at_answer else 2)
    finally:
        await rig.close()


async def test_a_full_queue_drops_without_blocking_and_the_replay_recovers(
        ctx: zmq.asyncio.Context) -> None:
    """A one-slot queue behind a held replay: batch 3 queues, 4 and 5 find it full and are
    dropped (the receiver never waits). The gap's replay answers as of its request (up to 2),
    3 applies from the queue, and only the resync the overflow flagged brings 4 and 5 back (no
    tail check to find them). The replay is held by the test, so the burst lands while the
    applier is busy on every machine (an unheld replay could finish first, nothing queued)."""
    rig, publisher = await start(ctx, queue_size=1, replay_timeout_s=60.0, tail_check_s=0)
    try:
        publisher.hold = asyncio.Event()
        asked = len(publisher.requests)
        await publish(rig, 1, live=False)
        await publish(rig, 2, live=True)
        await eventually(lambda: len(publisher.requests) > asked, "the replay request")
        for n in (3, 4, 5):
            await publish(rig, n, live=True)

        def dropped() -> float:
            return rig.metric("kvroute_kv_events_dropped_total", endpoint="engine-0",
                              reason="queue_full")

        await eventually(lambda: dropped() == 2, "4 and 5 dropped, 3 queued")
        assert rig.subscriber._queue.qsize() == 1
        publisher.hold.set()
        await settled(rig, 5)
        assert_complete(rig, 5)
    finally:
        await rig.close()


async def test_a_gap_whose_replay_times_out_is_not_stepped_over(
        ctx: zmq.asyncio.Context) -> None:
    """Batch 1 lost, the replay for the gap at 2 goes unanswered: 2 must not be applied over
    the hole (the next replay would start after it and 1 would be missing for good)."""
    rig, publisher = await start(ctx, replay_timeout_s=0.5)
    try:
        publisher.ignore = 1
        asked = len(publisher.requests)
        await publish(rig, 1, live=False)
        await publish(rig, 2, live=True)
        await eventually(lambda: rig.metric("kvroute_kv_events_replays_total",
                                            endpoint="engine-0", outcome="timeout") >= 1,
                         "the replay timed out")
        assert publisher.requests[asked] == 0
        await publish(rig, 3, live=True)
        await settled(rig, 3)
        assert_complete(rig, 3)
    finally:
        await rig.close()


async def test_a_replay_answer_with_a_hole_is_not_applied_past_it(
        ctx: zmq.asyncio.Context) -> None:
    """The answer to the gap's replay lacks batch 1 (a ROUTER drops what exceeds its
    high-water mark, silently): 2 and 3 wait until a second replay brings 1."""
    rig, publisher = await start(ctx)
    try:
        publisher.omit = {1: 1}
        await publish(rig, 1, live=False)
        await publish(rig, 2, live=False)
        await publish(rig, 3, live=True)
        await settled(rig, 3)
        assert_complete(rig, 3)
        assert rig.metric("kvroute_kv_events_replays_total", endpoint="engine-0",
                          outcome="incomplete") == 1
    finally:
        await rig.close()


async def test_a_replay_answer_that_ends_before_the_live_batch_is_not_stepped_past(
        ctx: zmq.asyncio.Context) -> None:
    """The answer to the gap's replay ends before the live batch that revealed the gap (its
    tail lost: 2 and 3 left out). Applying live batch 3 after it stepped over 2 for good (the
    next replay starts after 3): one engine's index a batch short with ``synced: true``, seen
    once in the fault suite of a clean clone. 3 waits for a replay that brings 2."""
    rig, publisher = await start(ctx)
    try:
        publisher.omit = {2: 1, 3: 1}
        await publish(rig, 1, live=False)
        await publish(rig, 2, live=False)
        await publish(rig, 3, live=True)
        await settled(rig, 3)
        assert_complete(rig, 3)
    finally:
        await rig.close()


async def test_a_hole_the_engine_cannot_fill_is_accepted_after_bounded_retries(
        ctx: zmq.asyncio.Context) -> None:
    """Batch 1 is in no answer (lost at the source): after ``MAX_HOLE_RETRIES`` more replays
    the subscriber counts the loss and goes on, instead of replaying forever."""
    rig, publisher = await start(ctx)
    try:
        publisher.omit = {1: ALWAYS}
        await publish(rig, 1, live=False)
        await publish(rig, 2, live=True)
        await settled(rig, 2)
        await publish(rig, 3, live=True)
        await settled(rig, 3)
        assert rig.matched(tokens_of(1)) == 0
        assert [n for n in (0, 2, 3) if rig.matched(tokens_of(n)) != 2] == []
        assert rig.metric("kvroute_kv_events_replays_total", endpoint="engine-0",
                          outcome="hole") == 1
        assert rig.metric("kvroute_kv_events_replays_total", endpoint="engine-0",
                          outcome="incomplete") == MAX_HOLE_RETRIES
    finally:
        await rig.close()


async def test_a_fresh_engines_lost_first_batch_is_a_gap(ctx: zmq.asyncio.Context) -> None:
    """The subscriber's first replay finds nothing (the engine has published nothing yet), then
    the engine's seq 0 is lost on the PUB socket and seq 1 arrives. Seq 1 is not where the
    engine's history starts: it was applied as the first batch and seq 0 stepped over for good
    (the tail check asks from seq 1), seen in the fault suite as one engine's index a batch
    short with ``synced: true``."""
    rig = Rig(ctx, publisher=ScriptedPublisher, tail_check_s=0)
    try:
        publisher = rig.publisher
        assert isinstance(publisher, ScriptedPublisher)
        status = rig.subscriber.status
        await eventually(lambda: status.connected and status.synced and publisher.requests == [0],
                         "the first replay answered (empty)")
        # The SUB's subscription has reached the PUB once a message of any kind arrives (a
        # two-frame one is not a batch: counted as dropped, nothing else).
        for _ in range(500):
            await publisher.pub.send_multipart([TOPIC, b"probe"])
            await asyncio.sleep(0.01)
            if status.dropped:
                break
        assert status.dropped, "the SUB never received"
        await publish(rig, 0, live=False)
        await publish(rig, 1, live=True)
        await settled(rig, 1)
        assert_complete(rig, 1)
        assert status.gaps == 1
    finally:
        await rig.close()


async def test_a_lost_last_batch_is_found_by_the_tail_check(ctx: zmq.asyncio.Context) -> None:
    """The engine's last batch is lost and nothing follows it to reveal the gap: an idle
    subscriber asks the replay socket what follows its last batch."""
    rig, _ = await start(ctx, tail_check_s=0.2)
    try:
        await publish(rig, 1, live=False)
        await settled(rig, 1)
        assert_complete(rig, 1)
    finally:
        await rig.close()


async def test_two_frame_replay_answers(ctx: zmq.asyncio.Context) -> None:
    """vLLM's ``ZmqEventPublisher`` answers ``[seq, payload]`` (no topic frame) and ends with
    ``[-1, b""]``; the three-frame form is the emulator's and the tests' default."""
    rig, publisher = await start(ctx, replay_timeout_s=30.0)
    try:
        publisher.bare = True
        await publish(rig, 1, live=False)
        await publish(rig, 2, live=True)
        await settled(rig, 2)
        assert_complete(rig, 2)
        assert rig.metric("kvroute_kv_events_replays_total", endpoint="engine-0",
                          outcome="timeout") == 0
    finally:
        await rig.close()


async def test_while_a_resync_is_due_live_batches_do_not_move_its_start(
        ctx: zmq.asyncio.Context) -> None:
    """The engine restarts behind the same address (sequence from 0, the first batches lost
    before the SUB reconnects) and its replay socket does not answer for a while. Live batches
    that look like a continuation (seq = last + 1) must not be applied: they would move the
    replay's start to a seq where the new engine's batch is the one applied, and the restart
    (its old blocks, its first batches) would never be seen."""
    rig, _ = await start(ctx, replay_timeout_s=0.3, replay_backoff_s=0.05,
                         replay_backoff_max_s=0.1)
    try:
        await publish(rig, 1, live=True)
        await settled(rig, 1)
        received: list[int] = []
        queue = rig.subscriber._queue
        put = queue.put_nowait

        def recording(item: tuple[int, bytes]) -> None:
            received.append(item[0])
            put(item)

        queue.put_nowait = recording  # type: ignore[method-assign]
        await rig.restart_publisher()
        publisher = rig.publisher
        assert isinstance(publisher, ScriptedPublisher)
        publisher.silent = asyncio.Event()
        status = rig.subscriber.status

        def fresh(n: int) -> list[int]:
            return list(range(5000 + 2 * BLOCK * n, 5000 + 2 * BLOCK * (n + 1)))

        # Until the SUB has reconnected, live batches are lost (only the replay has them).
        for n in range(200):
            assert await publisher.publish([stored(rig.hasher, fresh(n))]) == n
            if received:
                break
            await asyncio.sleep(0.02)
        assert received, "the SUB never reconnected"
        last = await publisher.publish([stored(rig.hasher, fresh(n + 1))])
        await eventually(lambda: last in received and queue.qsize() == 0,
                         "the live batches taken")
        asked = len(publisher.requests)
        await eventually(lambda: len(publisher.requests) >= asked + 2,
                         "two more unanswered replays (the loop is past the last batch)")
        publisher.silent.set()
        last = await publisher.publish([stored(rig.hasher, fresh(last + 1))])
        await eventually(lambda: status.last_seq == last and status.synced, "in sync again")
        assert status.restarts >= 1
        assert rig.matched(tokens_of(0)) == rig.matched(tokens_of(1)) == 0  # old blocks gone
        assert [k for k in range(last + 1)
                if rig.index.match(rig.hasher.block_hashes(fresh(k)))["engine-0"] != 2] == []
    finally:
        await rig.close()


async def test_without_a_replay_socket_a_gap_is_stepped_over_and_later_batches_apply() -> None:
    """An engine without a replay endpoint cannot fill a gap: the subscriber counts it and
    applies the live batch that revealed it, and every batch after. (The rule that a live
    batch waits for a replay answer that reaches it once applied here too, so every batch
    after the first gap was dropped for good.)"""
    hasher = BlockHasher(BlockHashConfig(BLOCK))
    subscriber = KVEventSubscriber(KVEventSource("engine-0", "tcp://127.0.0.1:1", None),
                                   PrefixIndex(), hasher, KVEventMetrics())
    for seq in (0, 2, 3):  # batch 1 lost on the way
        payload = msgspec.msgpack.encode([0.0, [stored(hasher, tokens_of(seq))], 0])
        await subscriber._accept(seq, payload)
    assert subscriber.status.last_seq == 3 and subscriber.status.gaps == 1
    for seq in (0, 2, 3):
        assert subscriber.index.match(hasher.block_hashes(tokens_of(seq)))["engine-0"] == 2


# -- an idle subscriber sleeps ------------------------------------------------------------------
async def test_an_idle_applier_does_not_poll(ctx: zmq.asyncio.Context) -> None:
    """In sync, tail checks off, nothing published: the applier waits on its queue once.
    It used to wake every ``idle_poll_s`` (0.2 s by default) to look for a due resync, which
    with 16 engines cost an idle router ~10 ms of CPU a second."""
    rig, _ = await start(ctx, idle_poll_s=0.01, tail_check_s=0.0)
    try:
        await settled(rig, 0)
        waits = 0
        get = rig.subscriber._queue.get

        async def counted() -> tuple[int, bytes]:
            nonlocal waits
            waits += 1
            return await get()

        rig.subscriber._queue.get = counted  # type: ignore[method-assign]
        await asyncio.sleep(0.5)  # 50 polls' worth of idle_poll_s
        assert waits <= 1, f"the idle applier woke {waits} times"
        await publish(rig, 1, live=True)  # and a batch still reaches it
        await settled(rig, 1)
        assert_complete(rig, 1)
    finally:
        await rig.close()


async def test_stop_ends_an_idle_subscriber_without_a_poll(ctx: zmq.asyncio.Context) -> None:
    """stop() alone ends run(): the session waits for its tasks or for stop, not on a timer
    (with a 30 s poll it used to take up to 30 s)."""
    rig, _ = await start(ctx, idle_poll_s=30.0, tail_check_s=0.0)
    try:
        await settled(rig, 0)
        rig.subscriber.stop()
        done, _ = await asyncio.wait({rig.task}, timeout=10.0)
        assert done, "run() did not end after stop()"
    finally:
        await rig.close()


async def test_a_reconnect_is_resynchronised_without_a_batch_to_reveal_it(
        ctx: zmq.asyncio.Context) -> None:
    """The engine goes away and comes back and publishes nothing: the reconnect itself wakes
    the parked applier, which asks the replay socket at once (not at its next poll, here 30 s
    away)."""
    rig, _ = await start(ctx, idle_poll_s=30.0, tail_check_s=0.0)
    try:
        await settled(rig, 0)
        disconnects = rig.subscriber.metrics.reconnects.labels("engine-0")._value.get()
        await rig.restart_publisher()
        publisher = rig.publisher
        assert isinstance(publisher, ScriptedPublisher)
        await eventually(lambda: rig.subscriber.metrics.reconnects.labels(
            "engine-0")._value.get() > disconnects, "the reconnect")
        await eventually(lambda: bool(publisher.requests), "a replay asked after the reconnect")
    finally:
        await rig.close()


# -- a negative sequence number is no batch ------------------------------------------------------
NEGATIVE = (-3).to_bytes(8, "big", signed=True)


async def test_a_negative_seq_does_not_look_like_an_engine_restart(
        ctx: zmq.asyncio.Context) -> None:
    """Batches are numbered from 0 (-1 only ends a replay). A live frame with seq -3 and a
    well-formed payload used to read as "the engine restarted" (a seq at or below the last
    applied, with other content): the endpoint's blocks were dropped and rebuilt."""
    rig, publisher = await start(ctx)
    try:
        payload = msgspec.msgpack.encode([0.0, [stored(rig.hasher, tokens_of(7))], 0])
        await publisher.pub.send_multipart([TOPIC, NEGATIVE, payload])
        await publish(rig, 1, live=True)
        await settled(rig, 1)
        assert_complete(rig, 1)
        assert rig.subscriber.status.restarts == 0
        assert rig.matched(tokens_of(7)) == 0
        assert rig.metric("kvroute_kv_events_dropped_total", endpoint="engine-0",
                          reason="undecodable") == 1
    finally:
        await rig.close()


async def test_a_negative_first_seq_does_not_wedge_the_subscriber(
        ctx: zmq.asyncio.Context) -> None:
    """An engine that has published nothing yet: a first live frame with seq -3 was applied
    as the first batch, and every later replay asked from -3, which a replay request cannot
    encode: the session failed, restarted, and failed again, for good (found by
    test_fuzz_frames.py)."""
    rig = Rig(ctx, publisher=ScriptedPublisher)
    try:
        await eventually(lambda: rig.subscriber.status.connected
                         and rig.subscriber.status.synced, "the first resync")
        payload = msgspec.msgpack.encode([0.0, [stored(rig.hasher, tokens_of(7))], 0])
        await rig.publisher.pub.send_multipart([TOPIC, NEGATIVE, payload])
        await publish_until_seen(rig, tokens_of(0), 2)  # seq 0
        assert rig.subscriber.status.last_seq == 0
        assert not rig.task.done()
    finally:
        await rig.close()
