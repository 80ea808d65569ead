"""The vLLM KV-event wire format, decoded by field name.

A ZMQ message is ``[topic, seq, payload]``: ``seq`` an 8-byte big-endian signed integer (the
replay socket ends its answer with ``seq = -1``), ``payload`` msgpack ``[ts, events, dp_rank]``.
Each event is a map tagged by ``"type"``: ``BlockStored``, ``BlockRemoved`` or
``AllBlocksCleared``. Fields are read by name; unknown fields are ignored, and an event of an
unknown type is skipped (counted by the caller), so newer engines that add fields or event kinds
do not break the router. Block hashes arrive as uint64 integers (vLLM's default) or, with
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``, as full digests; both become the uint64 form
(:func:`event_hashes`).

A batch is decoded in one pass when every event in it is of a known type (the usual case) and
event by event otherwise. ``BlockStored.token_ids`` stays msgpack until something asks for it
(:meth:`BlockStored.tokens`): only the hash self-check reads token ids, and only for a sample
of events, while turning ~7k ids into Python integers for every event was the largest part of
decoding a long prompt's batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import msgspec

from kvroute_router.kvevents.hashing import to_event_int

END_OF_REPLAY_SEQ = -1
GPU_MEDIUM = "GPU"
_UINT64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_EMPTY_ARRAY = msgspec.Raw(b"\x90")
_tokens_decoder = msgspec.msgpack.Decoder(list[int])


class BlockStored(msgspec.Struct, tag="BlockStored", tag_field="type"):
    """New full blocks cached by the engine, in chain order."""

    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None = None
    token_ids: msgspec.Raw = _EMPTY_ARRAY  # msgpack, as published: read it with tokens()
    block_size: int = 0
    lora_id: int | None = None
    lora_name: str | None = None
    medium: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None

    def tokens(self) -> list[int] | None:
        """The blocks' token ids; None when the field is not a list of integers (a garbled
        event: its block hashes are still indexed, its tokens cannot be checked)."""
        try:
            return _tokens_decoder.decode(self.token_ids)
        except msgspec.DecodeError:
            return None


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


class _KnownBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[KVEvent]
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
_known_batch_decoder = msgspec.msgpack.Decoder(_KnownBatch)
_event_decoder = msgspec.msgpack.Decoder(KVEvent)


def decode_seq(frame: bytes) -> int:
    """The sequence frame: 8 bytes, big-endian, signed (``-1`` ends a replay)."""
    if len(frame) != 8:
        raise EventDecodeError(f"sequence frame must be 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)


def decode_batch(seq: int, payload: bytes) -> EventBatch:
    """Decode a payload; events of unknown types are counted in ``unknown_events``."""
    try:
        known = _known_batch_decoder.decode(payload)
    except msgspec.DecodeError:
        pass  # an event of an unknown type (or not a batch at all): event by event below
    else:
        return EventBatch(seq=seq, ts=known.ts, events=known.events,
                          data_parallel_rank=known.data_parallel_rank)
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
    return value & _UINT64_MAX


def event_hashes(values: list[int | bytes]) -> list[int]:
    """:func:`event_hash` of every value; the list itself when it is uint64 integers already
    (vLLM's default form: two passes in C instead of a Python call per block)."""
    try:
        if values and min(values) >= 0 and max(values) <= _UINT64_MAX:  # type: ignore[operator]
            return cast(list[int], values)
    except TypeError:
        pass  # digests (bytes) among them
    return [event_hash(value) for value in values]


def indexable(event: BlockStored | BlockRemoved) -> bool:
    """Whether an event is about the engine's GPU prefix cache of its first KV-cache group.

    The index tracks what a request can hit in device memory; offloaded tiers (``CPU``,
    ``STORAGE``) and secondary groups of hybrid models are left out.
    """
    return (event.medium in (None, GPU_MEDIUM)) and (event.group_idx in (None, 0))
