"""Fuzzing KV-event frames (issue 16), bounded: hypothesis-generated payloads — random bytes
and well-formed msgpack with hostile field values — through the subscriber's apply path with
the hash self-check on, and garbage multipart messages through a real ZMQ PUB socket on
loopback. Invariants: nothing raises out of the subscriber, its session never dies, a valid
batch after the garbage is applied, and its memory stays bounded (the recent-digest map, the
queue, the index holds only what valid events stored)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kvroute_router.kvevents.hashing import BlockHashConfig, BlockHasher
from kvroute_router.kvevents.index import PrefixIndex
from kvroute_router.kvevents.metrics import KVEventMetrics
from kvroute_router.kvevents.subscriber import (
    RECENT_DIGESTS,
    KVEventSource,
    KVEventSubscriber,
    SubscriberSettings,
)

from .test_subscriber import BLOCK, TOPIC, LoopbackPublisher, free_port, stored

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
HASH = st.one_of(INT64, st.binary(max_size=40))
ANY_SCALAR = st.one_of(st.none(), st.booleans(), INT64, st.floats(allow_nan=True),
                       st.text(max_size=8), st.binary(max_size=8))


def _event() -> st.SearchStrategy[dict[str, Any]]:
    stored_event = st.fixed_dictionaries({
        "type": st.just("BlockStored"),
        "block_hashes": st.lists(HASH, max_size=8),
        "parent_block_hash": st.one_of(st.none(), HASH),
        "token_ids": st.lists(INT64, max_size=40),
        "block_size": st.one_of(st.integers(-2, 40), INT64),
        "lora_id": st.one_of(st.none(), INT64),
        "medium": st.sampled_from([None, "GPU", "CPU", ""]),
    }, optional={"extra_keys": st.lists(ANY_SCALAR, max_size=3),
                 "group_idx": st.one_of(st.none(), st.integers(-1, 3)),
                 "lora_name": st.one_of(st.none(), st.text(max_size=8))})
    removed = st.fixed_dictionaries({
        "type": st.just("BlockRemoved"), "block_hashes": st.lists(HASH, max_size=8),
        "medium": st.sampled_from([None, "GPU", "CPU"])})
    odd = st.dictionaries(st.text(max_size=12), ANY_SCALAR, max_size=4)
    return st.one_of(stored_event, removed, st.just({"type": "AllBlocksCleared"}), odd)


PAYLOADS = st.one_of(
    st.binary(max_size=256),
    st.builds(lambda ts, events, rank: msgspec.msgpack.encode([ts, events, rank]),
              st.one_of(st.floats(allow_nan=True), INT64, st.text(max_size=4)),
              st.lists(_event(), max_size=6), st.one_of(st.none(), INT64)),
    st.builds(msgspec.msgpack.encode, st.lists(ANY_SCALAR, max_size=4)),
)


def _subscriber() -> KVEventSubscriber:
    return KVEventSubscriber(
        KVEventSource("engine-0", "tcp://127.0.0.1:1", None), PrefixIndex(),
        BlockHasher(BlockHashConfig(BLOCK)), KVEventMetrics(),
        settings=SubscriberSettings(self_check_sample_every=1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(PAYLOADS, min_size=1, max_size=8))
@example(payloads=[msgspec.msgpack.encode([0.0, [{  # found by this test: a non-list extra key
    "type": "BlockStored", "block_hashes": [0], "parent_block_hash": None,
    "token_ids": [0] * BLOCK, "block_size": BLOCK, "extra_keys": [1]}], None])])
def test_any_payload_is_applied_or_dropped_never_raises(payloads: list[bytes]) -> None:
    subscriber = _subscriber()
    stored_hashes = 0
    for seq, payload in enumerate(payloads):
        subscriber._apply(seq, payload, "live")
        stored_hashes += 8 * len(payload)  # generous: no more blocks than hash entries sent
    assert len(subscriber._recent) <= RECENT_DIGESTS
    assert subscriber.index.block_count("engine-0") <= stored_hashes
    assert subscriber.status.last_seq == len(payloads) - 1


FRAME = st.binary(max_size=64)
MESSAGES = st.lists(st.one_of(
    st.lists(FRAME, min_size=1, max_size=5).map(lambda f: [TOPIC, *f]),  # wrong frame counts
    st.tuples(st.binary(min_size=0, max_size=12), PAYLOADS).map(
        lambda t: [TOPIC, t[0], t[1]]),  # bad sequence frames
    st.tuples(st.integers(-3, 2**63 - 1), PAYLOADS).map(
        lambda t: [TOPIC, t[0].to_bytes(8, "big", signed=True), t[1]]),  # odd seq, any payload
), min_size=1, max_size=30)


def _contradicts_the_block_size(messages: list[list[bytes]]) -> bool:
    """Whether a message holds a well-formed BlockStored made with another block size: the
    self-check's ERROR alarm is then the designed answer (an engine configured unlike the
    router), not a fault the garbage caused."""
    for message in messages:
        try:
            batch = msgspec.msgpack.decode(message[-1])
        except (msgspec.DecodeError, IndexError, ValueError):  # not msgpack, bad UTF-8
            continue
        events = batch[1] if isinstance(batch, list) and len(batch) > 1 else None
        for event in events if isinstance(events, list) else []:
            if not isinstance(event, dict) or event.get("type") != "BlockStored":
                continue
            size, hashes, tokens = (event.get("block_size"), event.get("block_hashes"),
                                    event.get("token_ids"))
            if isinstance(size, int) and size > 0 and size != BLOCK and hashes and \
                    isinstance(tokens, list) and len(tokens) >= len(hashes) * size:
                return True
    return False


async def _garbage_then_valid(messages: list[list[bytes]]) -> None:
    ctx = zmq.asyncio.Context()
    errors: list[logging.LogRecord] = []
    alarm_expected = _contradicts_the_block_size(messages)

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR and not (
                    alarm_expected and "hash mismatch" in record.getMessage()):
                errors.append(record)

    handler = Collect()
    logging.getLogger("kvroute").addHandler(handler)
    pub_port, replay_port = free_port(), free_port()
    publisher = LoopbackPublisher(ctx, pub_port, replay_port)
    hasher = BlockHasher(BlockHashConfig(block_size=BLOCK))
    index = PrefixIndex()
    subscriber = KVEventSubscriber(
        KVEventSource("engine-0", f"tcp://127.0.0.1:{pub_port}",
                      f"tcp://127.0.0.1:{replay_port}"),
        index, BlockHasher(BlockHashConfig(BLOCK)), KVEventMetrics(), context=ctx,
        settings=SubscriberSettings(queue_size=64, replay_timeout_s=2.0, idle_poll_s=0.05))
    task = asyncio.create_task(subscriber.run())
    try:
        deadline = time.monotonic() + 15
        while not subscriber.status.connected:
            assert time.monotonic() < deadline, "no connection"
            await asyncio.sleep(0.02)
        for message in messages:
            await publisher.pub.send_multipart(message)
        tokens = list(range(500, 508))
        hashes = hasher.block_hashes(tokens)
        deadline = time.monotonic() + 30
        while index.match(hashes).get("engine-0", 0) != 2:
            assert time.monotonic() < deadline, "the valid batch after the garbage never landed"
            assert not task.done(), "the subscriber ended"
            await publisher.publish([stored(hasher, tokens)])
            await asyncio.sleep(0.1)
        assert len(subscriber._recent) <= RECENT_DIGESTS
        assert subscriber._queue.qsize() <= 64
        assert not errors, [r.getMessage() for r in errors]
    finally:
        logging.getLogger("kvroute").removeHandler(handler)
        subscriber.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await publisher.close()
        ctx.destroy(linger=0)


def test_a_malformed_block_stored_does_not_raise_the_hash_alarm() -> None:
    # Found by the fuzzing below: a BlockStored with fewer tokens than its blocks hold made the
    # self-check compute fewer hashes than published and declare a mismatch (ERROR log, precise
    # routing off for the endpoint). It says nothing about the hash settings: unverifiable.
    subscriber = _subscriber()
    assert subscriber.self_check is not None
    for seq, event in enumerate([
            {"type": "BlockStored", "block_hashes": [0], "token_ids": [], "block_size": BLOCK},
            {"type": "BlockStored", "block_hashes": [0], "token_ids": [1, 2, 3, 4]}]):  # size 0
        subscriber._apply(seq, msgspec.msgpack.encode([0.0, [event], 0]), "live")
    status = subscriber.self_check.status
    assert status.state != "mismatch" and status.unverifiable == 2


def test_garbled_token_ids_are_unverifiable_and_the_blocks_still_indexed() -> None:
    # Token ids stay msgpack until the self-check reads them: ids that are not integers make
    # the check unverifiable (no alarm), and the event's blocks are indexed all the same.
    subscriber = _subscriber()
    assert subscriber.self_check is not None
    subscriber._apply(0, msgspec.msgpack.encode([0.0, [
        {"type": "BlockStored", "block_hashes": [11], "parent_block_hash": None,
         "token_ids": ["a", "b", "c", "d"], "block_size": BLOCK}], 0]), "live")
    status = subscriber.self_check.status
    assert status.state != "mismatch" and status.unverifiable == 1
    assert subscriber.index.block_count("engine-0") == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@example(messages=[[TOPIC, (1).to_bytes(8, "big"), msgspec.msgpack.encode([0.0, [
    {"type": "BlockStored", "block_hashes": [0], "token_ids": [], "block_size": BLOCK},
    {"type": "BlockStored", "block_hashes": [0], "_": "no block_size"}], 0])]])
@example(messages=[[TOPIC, (1).to_bytes(8, "big"), msgspec.msgpack.encode([0.0, [
    {"type": "BlockStored", "block_hashes": [7], "token_ids": [3], "block_size": 1}], 0])]])
@given(messages=MESSAGES)
def test_garbage_frames_over_zmq_never_kill_the_subscriber(messages: list[list[bytes]]) -> None:
    asyncio.run(_garbage_then_valid(messages))
