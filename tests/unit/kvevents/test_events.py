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
