"""The vLLM KV-event wire format, decoded by field name.

A ZMQ message is ``[topic, seq, payload]``: ``seq`` an 8-byte big-endian signed integer (the
replay socket ends its answer with ``seq = -1``), ``payload`` msgpack ``[ts, events, dp_rank]``.
Each event is a map tagged by ``"type"``: ``BlockStored``, ``BlockRemoved`` or
``AllBlocksCleared``. Fields are read by name; unknown fields are ignored, and an event of an
unknown type is skipped (counted by the caller), so newer engines that add fields or event kinds
do not break the router. Block hashes arrive as uint64 integers (vLLM's default) or, with
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``, as full digests; both become the uint64 form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvroute_router.kvevents.hashing import to_event_int

END_OF_REPLAY_SEQ = -1
GPU_MEDIUM = "GPU"


class BlockStored(msgspec.Struct, tag="BlockStored", tag_field="type"):
    """New full blocks cached by the engine, in chain order."""

    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None = None
    token_ids: list[int] = msgspec.field(default_factory=list)
    block_size: int = 0
    lora_id: int | None = None
    lora_name: str | None = None
    medium: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, tag="BlockRemoved", tag_field="type"):
    """Blocks evicted from the engine's prefix cache."""

    block_hashes: list[int | bytes]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", tag_field="type"):
    """The engine dropped its whole prefix cache (reset, or a restart's first word)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class _WireBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


@dataclass
class EventBatch:
    """One published batch: its sequence number, timestamp and the events we understood."""

    seq: int
    ts: float
    events: list[KVEvent] = field(default_factory=list)
    data_parallel_rank: int | None = None
    unknown_events: int = 0


class EventDecodeError(ValueError):
    """A message that is not a KV-event batch at all (wrong frame count, bad msgpack)."""


_batch_decoder = msgspec.msgpack.Decoder(_WireBatch)
_event_decoder = msgspec.msgpack.Decoder(KVEvent)


def decode_seq(frame: bytes) -> int:
    """The sequence frame: 8 bytes, big-endian, signed (``-1`` ends a replay)."""
    if len(frame) != 8:
        raise EventDecodeError(f"sequence frame must be 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)


def decode_batch(seq: int, payload: bytes) -> EventBatch:
    """Decode a payload; events of unknown types are counted in ``unknown_events``."""
    try:
        wire = _batch_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"payload of batch {seq} is not [ts, events, rank]: {exc}") from exc
    batch = EventBatch(seq=seq, ts=wire.ts, data_parallel_rank=wire.data_parallel_rank)
    for raw in wire.events:
        try:
            batch.events.append(_event_decoder.decode(raw))
        except msgspec.DecodeError:
            batch.unknown_events += 1
    return batch


def event_hash(value: int | bytes) -> int:
    """A published block hash in uint64 form, whichever way the engine sent it."""
    if isinstance(value, bytes):
        return to_event_int(value)
    return value & 0xFFFF_FFFF_FFFF_FFFF


def indexable(event: BlockStored | BlockRemoved) -> bool:
    """Whether an event is about the engine's GPU prefix cache of its first KV-cache group.

    The index tracks what a request can hit in device memory; offloaded tiers (``CPU``,
    ``STORAGE``) and secondary groups of hybrid models are left out.
    """
    return (event.medium in (None, GPU_MEDIUM)) and (event.group_idx in (None, 0))
