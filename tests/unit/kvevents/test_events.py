"""Decoding the KV-event wire format by field name."""

from __future__ import annotations

import msgspec
import pytest
from kvroute_router.kvevents.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventDecodeError,
    decode_batch,
    decode_seq,
    event_hash,
    event_hashes,
    indexable,
)


def test_decodes_events_by_name_ignoring_unknown_fields_and_types() -> None:
    payload = msgspec.msgpack.encode([
        1.5,
        [
            {"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None,
             "token_ids": list(range(8)), "block_size": 4, "lora_id": None, "medium": "GPU",
             "lora_name": None, "brand_new_field": {"x": 1}},
            {"type": "BlockRemoved", "block_hashes": [b"\x00" * 24 + b"\x00" * 7 + b"\x05"],
             "medium": "GPU"},
            {"type": "SomethingNew", "x": 1},
            {"type": "AllBlocksCleared"},
        ],
        0,
        "future trailing field",
    ])
    batch = decode_batch(3, payload)
    assert batch.seq == 3
    assert batch.unknown_events == 1
    stored, removed, cleared = batch.events
    assert isinstance(stored, BlockStored) and stored.block_hashes == [1, 2]
    assert stored.tokens() == list(range(8))
    assert isinstance(removed, BlockRemoved) and event_hash(removed.block_hashes[0]) == 5
    assert isinstance(cleared, AllBlocksCleared)
    assert indexable(stored)
    assert not indexable(BlockRemoved(block_hashes=[1], medium="CPU"))


def test_sequence_frames_and_bad_payloads() -> None:
    assert decode_seq((-1).to_bytes(8, "big", signed=True)) == -1
    assert decode_seq((7).to_bytes(8, "big")) == 7
    with pytest.raises(EventDecodeError):
        decode_seq(b"\x01")
    with pytest.raises(EventDecodeError, match="batch 4"):
        decode_batch(4, b"\xc1")


def test_a_batch_of_known_events_decodes_the_same_in_one_pass_as_event_by_event() -> None:
    events: list[dict[str, object]] = [
        {"type": "BlockStored", "block_hashes": [2**64 - 1, -1, b"\x07" * 32],
         "parent_block_hash": 5, "token_ids": [1, 2, 3, 4] * 3, "block_size": 4,
         "extra_keys": [None, None, None], "group_idx": 0, "medium": "GPU"},
        {"type": "BlockRemoved", "block_hashes": [9], "medium": "CPU"},
        {"type": "AllBlocksCleared"},
    ]
    known = decode_batch(1, msgspec.msgpack.encode([2.0, events, 3]))
    # the same events with one of an unknown type among them: decoded event by event
    mixed = decode_batch(1, msgspec.msgpack.encode([2.0, [*events, {"type": "New"}], 3]))
    assert known.unknown_events == 0 and mixed.unknown_events == 1
    assert (known.ts, known.data_parallel_rank) == (mixed.ts, mixed.data_parallel_rank) == (2.0, 3)
    assert [type(e) for e in known.events] == [type(e) for e in mixed.events] == [
        BlockStored, BlockRemoved, AllBlocksCleared]
    for a, b in zip(known.events, mixed.events, strict=True):
        assert msgspec.msgpack.encode(a) == msgspec.msgpack.encode(b)
    stored = known.events[0]
    assert isinstance(stored, BlockStored) and stored.tokens() == [1, 2, 3, 4] * 3


def test_token_ids_that_are_not_integers_leave_the_event_indexable() -> None:
    # Token ids are read only by the hash self-check; an event whose ids are garbled still
    # says which blocks the engine holds (its hashes decode), and tokens() says None.
    for garbled in (["a", "b"], "text", [1.5], {"x": 1}, None):
        batch = decode_batch(0, msgspec.msgpack.encode([0.0, [
            {"type": "BlockStored", "block_hashes": [3], "token_ids": garbled,
             "block_size": 4}], 0]))
        (stored,) = batch.events
        assert isinstance(stored, BlockStored) and stored.block_hashes == [3]
        assert stored.tokens() is None
    absent = decode_batch(0, msgspec.msgpack.encode([0.0, [
        {"type": "BlockStored", "block_hashes": [3]}], 0])).events[0]
    assert isinstance(absent, BlockStored) and absent.tokens() == []


def test_event_hashes_is_event_hash_of_each_and_keeps_a_list_already_in_uint64_form() -> None:
    plain: list[int | bytes] = [0, 1, 2**64 - 1, 12345]
    assert event_hashes(plain) is plain  # vLLM's default form: no copy, no per-block call
    digest = b"\x00" * 24 + (77).to_bytes(8, "big")
    cases: list[list[int | bytes]] = [[-1, 5], [digest, 3], [digest], [3, digest, -(2**63)], []]
    for values in cases:
        assert event_hashes(values) == [event_hash(v) for v in values]
    assert event_hashes([-1]) == [2**64 - 1]
