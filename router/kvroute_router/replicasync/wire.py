"""The replica-sync message: what one router replica tells the others about its dispatches.

A message is one Redis pub/sub payload::

    b"KVRS" | version u8 (1 to 5) | sender id (16 bytes) | record count u16 | records

and a record is one dispatch, in version 1::

    pool key length u16 | pool key (UTF-8) | endpoint length u16 | endpoint (UTF-8)
    | block count u32 | block hashes (uint64 each, big-endian)

Version 2 adds a flags byte after the endpoint, and a priority when flag 2 is set; version 3
allows flag 8, which adds a dispatch id and a token count; version 4 allows flag 16, which adds
the blocks the dispatch found held; version 5 allows flag 32 on an answered record (no field)::

    ... | endpoint (UTF-8) | flags u8 | [priority int64] | [dispatch id u32 | tokens u32]
    | [held count u32 | held block hashes] | block count u32 | block hashes

All integers are big-endian. The block hashes are the vLLM event form (uint64) of the prompt's
blocks the endpoint is about to compute — the ones the sender's index did not already show as
held there — and may be empty (the record still counts one dispatch). The flags carry the
sender's in-flight prefix (``Endpoint.prefill_in_flight``), so that the prefill wait and the
priority floor work across replicas as within one:

* 1, *computes*: the attempt registered ``blocks[0]`` as the first block of a prefix it is
  making the endpoint compute; a record with flag 4 follows when it starts answering or ends.
* 2, *priority*: the vLLM ``priority`` that attempt carries (priority engines; needs flag 1).
* 4, *answered*: the attempt started answering or ended; not a dispatch (no load, no pending
  marks). With one block, the attempt that was computing from ``blocks[0]`` ended its prefix;
  with flag 8, the attempt with that dispatch id left the endpoint's prefill backlog (one of
  the two at least; the token count is 0).
* 8, *backlog* (version 3): the attempt adds ``tokens`` (at least 1) prompt tokens to the
  endpoint's prefill backlog (``Endpoint.prefill_backlog``, what the ``prefill-cost`` scorer
  weighs) until an answered record with the same dispatch id (the sender's counter).
* 16, *held* (version 4): the prompt's leading blocks the sender's index showed held on the
  endpoint (at least one), which the dispatch puts in use there: the receiver moves them to
  the recent end of its own index, as the sender's eviction forecast did, so every replica
  forecasts the same evictions (without them a replica saw only its own share of the fleet's
  touches and hid the contexts the others kept busy; docs/benchmarks/emulated-fleet.md,
  round 32). Not on an answered record.
* 32, *started* (version 5, with flag 4): the attempt started answering — its first byte
  came from the endpoint — rather than ended without answering. The receiver counts it in
  ``Endpoint.answers_started``, which the proxy's per-try timeout reads to tell a busy engine
  (answering others) from a stuck one, so a replica that sends an engine nothing else still
  sees it answering the other replicas' requests. An answered record with this flag may carry
  no block and no dispatch id (every attempt's first byte is sent, not only those that had a
  prefix or backlog to take back).

A sender writes the lowest version its records need: 1 when no record has a flag, 2 when none
has flag 8, 16 or 32, 3 when none has flag 16 or 32, 4 when none has flag 32, so a replica
that reads only an older version keeps taking what it can read during a rolling upgrade
(today nearly every dispatch carries flag 16: a replica reading version 3 at most drops those
messages, counted as rejected, and routes on its own dispatches until it is upgraded too;
likewise nearly every message that carries an answered record carries flag 32 since version
5, which a replica reading version 4 drops).

Decoding is strict: a message that breaks any rule below is rejected whole with
:class:`WireError` (a message comes from a trusted hop, Redis, but a bug or a stray publisher
must cost at most that message): the magic and version, every length inside the payload and
under its limit, UTF-8 names, known flags in a valid combination, no trailing bytes.

A second kind of message, the *waiting report* (round 39), says which requests wait in the
sender's admission queues, so that each replica lets go only its own among the fleet's oldest::

    b"KVRW" | version u8 (1) | sender id (16 bytes) | policy count u16
    | per policy: key length u16 | policy key (UTF-8) | waiter count u16
                  | per waiter: -priority int64 | arrival Unix ms uint64

A report replaces everything the sender reported before (an empty one: it has no waiters);
policies at most :data:`MAX_POLICIES`, waiters per policy at most :data:`MAX_WAITERS` (the
first ones, in the order they go), at least one each. Decoded as strictly as dispatches. A
router that reads only dispatch messages rejects it as a bad magic (counted) and keeps
routing; during a rolling upgrade the old replicas' queues are simply not known to the new.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MAGIC = b"KVRS"
VERSION = 5
"""The newest version this router writes and reads (it reads 1 to 4 too)."""
COMPUTES, PRIORITY, ANSWERED, BACKLOG, HELD, STARTED = 1, 2, 4, 8, 16, 32
"""The record flags (version 2; ``BACKLOG`` version 3; ``HELD`` version 4; ``STARTED``
version 5)."""
_FLAGS = {1: 0, 2: COMPUTES | PRIORITY | ANSWERED, 3: COMPUTES | PRIORITY | ANSWERED | BACKLOG,
          4: COMPUTES | PRIORITY | ANSWERED | BACKLOG | HELD,
          5: COMPUTES | PRIORITY | ANSWERED | BACKLOG | HELD | STARTED}
"""The flags each version allows."""
SENDER_ID_BYTES = 16
MAX_MESSAGE_BYTES = 1 << 20
"""A message is at most 1 MiB (the sender splits larger batches)."""
MAX_RECORDS = 1024
MAX_NAME_BYTES = 512
"""A pool key is ``namespace/name`` (two DNS labels of at most 253 characters): 512 bytes."""
MAX_BLOCKS = 16384
"""Blocks per record: 256k tokens at vLLM's default 16-token blocks."""

_HEADER = struct.Struct(f">4sB{SENDER_ID_BYTES}sH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U8 = struct.Struct(">B")
_I64 = struct.Struct(">q")
_ID_TOKENS = struct.Struct(">II")
_WAITER = struct.Struct(">qQ")

WAITING_MAGIC = b"KVRW"
WAITING_VERSION = 1
MAX_POLICIES = 1024
"""Policies with waiters in one waiting report at most."""
MAX_WAITERS = 256
"""Waiters per policy in a waiting report at most (a replica's share of the room beyond that
is a fleet past any queue worth ordering)."""


class WireError(ValueError):
    """The payload is not a valid replica-sync message; the reason says which rule it broke."""


@dataclass(frozen=True)
class DispatchRecord:
    """One dispatch: ``endpoint`` of pool ``pool_key`` is about to compute ``blocks`` (or, with
    ``answered``, the end of one dispatch's prefill)."""

    pool_key: str
    endpoint: str
    blocks: tuple[int, ...] = ()
    computes: bool = False
    """The sender registered ``blocks[0]`` as the start of a prefix this dispatch computes."""
    priority: int | None = None
    """The vLLM priority that dispatch carries (only with ``computes``)."""
    answered: bool = False
    """Not a dispatch: the sender's dispatch computing from ``blocks[0]`` (the only block, if
    any) and/or the one with ``dispatch_id`` started answering or ended."""
    started: bool = False
    """With ``answered``: the attempt started answering (its first byte), not ended without."""
    dispatch_id: int | None = None
    """The sender's id of this dispatch (uint32), with ``tokens``: its prefill backlog."""
    tokens: int = 0
    """Prompt tokens the dispatch adds to the endpoint's prefill backlog (0 when answered)."""
    held: tuple[int, ...] = ()
    """The prompt's leading blocks the sender's index showed held on the endpoint, before
    ``blocks`` (the receiver touches them)."""

    @property
    def flags(self) -> int:
        return ((COMPUTES if self.computes else 0) | (PRIORITY if self.priority is not None else 0)
                | (ANSWERED if self.answered else 0)
                | (BACKLOG if self.dispatch_id is not None else 0)
                | (HELD if self.held else 0) | (STARTED if self.started else 0))

    def encoded_size(self) -> int:
        flags = self.flags
        return (2 + len(self.pool_key.encode()) + 2 + len(self.endpoint.encode()) + 4
                + 8 * len(self.blocks) + (1 if flags else 0) + (8 if flags & PRIORITY else 0)
                + (8 if flags & BACKLOG else 0) + (4 + 8 * len(self.held) if flags & HELD else 0))


def _version(records: Sequence[DispatchRecord]) -> int:
    """The lowest version that carries ``records``."""
    flags = 0
    for record in records:
        flags |= record.flags
    return (5 if flags & STARTED else 4 if flags & HELD else 3 if flags & BACKLOG
            else 2 if flags else 1)


def _check_flags(flags: int, blocks: int, tokens: int, version: int) -> None:
    """The rules a record's flags follow (``blocks``: how many block hashes it carries;
    ``tokens``: its backlog tokens)."""
    if flags & ~_FLAGS[version]:
        raise WireError(f"unknown record flags {flags:#x} in version {version}")
    if flags & ANSWERED:
        if (flags & ~(ANSWERED | BACKLOG | STARTED) or blocks > 1
                or (blocks == 0 and not flags & (BACKLOG | STARTED))):
            raise WireError("an answered record carries one block, a dispatch id, the started "
                            "flag or several of them, and no other flag")
        if tokens:
            raise WireError("an answered record carries no backlog tokens")
    elif flags & STARTED:
        raise WireError("the started flag without the answered flag")
    elif flags & BACKLOG and not tokens:
        raise WireError("a backlog record without tokens")
    if flags & PRIORITY and not flags & COMPUTES:
        raise WireError("a priority without the computes flag")
    if flags & COMPUTES and not blocks:
        raise WireError("a computes record without blocks")


def _name(value: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > MAX_NAME_BYTES:
        raise WireError(f"{what} is {len(raw)} bytes, more than {MAX_NAME_BYTES}")
    return raw


def encode(sender: bytes, records: Sequence[DispatchRecord]) -> bytes:
    """One message carrying ``records`` (at most :data:`MAX_RECORDS`, each within the limits;
    the caller keeps the whole under :data:`MAX_MESSAGE_BYTES`)."""
    if len(sender) != SENDER_ID_BYTES:
        raise WireError(f"sender id must be {SENDER_ID_BYTES} bytes, got {len(sender)}")
    if len(records) > MAX_RECORDS:
        raise WireError(f"{len(records)} records, more than {MAX_RECORDS}")
    version = _version(records)
    parts = [_HEADER.pack(MAGIC, version, sender, len(records))]
    for record in records:
        if len(record.blocks) > MAX_BLOCKS:
            raise WireError(f"{len(record.blocks)} blocks, more than {MAX_BLOCKS}")
        if len(record.held) > MAX_BLOCKS:
            raise WireError(f"{len(record.held)} held blocks, more than {MAX_BLOCKS}")
        flags = record.flags
        _check_flags(flags, len(record.blocks), record.tokens, version)
        pool = _name(record.pool_key, "pool key")
        endpoint = _name(record.endpoint, "endpoint name")
        parts += [_U16.pack(len(pool)), pool, _U16.pack(len(endpoint)), endpoint]
        if version > 1:
            parts.append(_U8.pack(flags))
            if record.priority is not None:
                if not -(1 << 63) <= record.priority < 1 << 63:
                    raise WireError(f"priority {record.priority} is not a 64-bit integer")
                parts.append(_I64.pack(record.priority))
            if record.dispatch_id is not None:
                if not (0 <= record.dispatch_id < 1 << 32 and 0 <= record.tokens < 1 << 32):
                    raise WireError(f"dispatch id {record.dispatch_id} or tokens "
                                    f"{record.tokens} is not a 32-bit unsigned integer")
                parts.append(_ID_TOKENS.pack(record.dispatch_id, record.tokens))
            if record.held:
                parts += [_U32.pack(len(record.held)),
                          struct.pack(f">{len(record.held)}Q", *record.held)]
        parts += [_U32.pack(len(record.blocks)),
                  struct.pack(f">{len(record.blocks)}Q", *record.blocks)]
    payload = b"".join(parts)
    if len(payload) > MAX_MESSAGE_BYTES:
        raise WireError(f"message is {len(payload)} bytes, more than {MAX_MESSAGE_BYTES}")
    return payload


def decode(payload: bytes) -> tuple[bytes, list[DispatchRecord]]:
    """The sender id and records of one message; :class:`WireError` if it breaks a rule."""
    version, sender, count = _header(payload, MAGIC, "a replica-sync message")
    if version not in _FLAGS:
        raise WireError(f"version {version}, this router reads 1 to {VERSION}")
    if count > MAX_RECORDS:
        raise WireError(f"{count} records, more than {MAX_RECORDS}")
    offset = _HEADER.size
    records: list[DispatchRecord] = []
    for _ in range(count):
        pool, offset = _read_name(payload, offset, "pool key")
        endpoint, offset = _read_name(payload, offset, "endpoint name")
        flags, priority, dispatch_id, tokens = 0, None, None, 0
        held: tuple[int, ...] = ()
        if version > 1:
            flags, offset = _read(payload, offset, _U8, "flags")
            if flags & PRIORITY:
                priority, offset = _read(payload, offset, _I64, "priority")
            if flags & BACKLOG:
                dispatch_id, offset = _read(payload, offset, _U32, "dispatch id")
                tokens, offset = _read(payload, offset, _U32, "tokens")
            if flags & HELD & _FLAGS[version]:
                held, offset = _read_hashes(payload, offset, "held block")
        blocks_n, offset = _read(payload, offset, _U32, "block count")
        if blocks_n > MAX_BLOCKS:
            raise WireError(f"{blocks_n} blocks, more than {MAX_BLOCKS}")
        _check_flags(flags, blocks_n, tokens, version)
        end = offset + 8 * blocks_n
        if end > len(payload):
            raise WireError("block hashes run past the end of the message")
        blocks = struct.unpack_from(f">{blocks_n}Q", payload, offset)
        records.append(DispatchRecord(pool, endpoint, blocks, computes=bool(flags & COMPUTES),
                                      priority=priority, answered=bool(flags & ANSWERED),
                                      dispatch_id=dispatch_id, tokens=tokens, held=held,
                                      started=bool(flags & STARTED)))
        offset = end
    if offset != len(payload):
        raise WireError(f"{len(payload) - offset} trailing bytes after the last record")
    return sender, records


def _header(payload: bytes, magic: bytes, what: str) -> tuple[int, bytes, int]:
    """(version, sender id, count) of a message of kind ``magic``, its size checked."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise WireError(f"message is {len(payload)} bytes, more than {MAX_MESSAGE_BYTES}")
    if len(payload) < _HEADER.size:
        raise WireError(f"message is {len(payload)} bytes, shorter than its header")
    found, version, sender, count = _HEADER.unpack_from(payload, 0)
    if found != magic:
        raise WireError(f"not {what} (bad magic)")
    return int(version), bytes(sender), int(count)


def _read_hashes(payload: bytes, offset: int, what: str) -> tuple[tuple[int, ...], int]:
    """A count (u32, at least 1, at most :data:`MAX_BLOCKS`) and that many uint64 hashes."""
    count, offset = _read(payload, offset, _U32, f"{what} count")
    if not 0 < count <= MAX_BLOCKS:
        raise WireError(f"{count} {what}s, not 1 to {MAX_BLOCKS}")
    end = offset + 8 * count
    if end > len(payload):
        raise WireError(f"{what} hashes run past the end of the message")
    return struct.unpack_from(f">{count}Q", payload, offset), end


def _read(payload: bytes, offset: int, shape: struct.Struct, what: str) -> tuple[int, int]:
    if offset + shape.size > len(payload):
        raise WireError(f"{what} runs past the end of the message")
    (value,) = shape.unpack_from(payload, offset)
    return int(value), offset + shape.size


def _read_name(payload: bytes, offset: int, what: str) -> tuple[str, int]:
    length, offset = _read(payload, offset, _U16, f"{what} length")
    if length > MAX_NAME_BYTES:
        raise WireError(f"{what} is {length} bytes, more than {MAX_NAME_BYTES}")
    end = offset + length
    if end > len(payload):
        raise WireError(f"{what} runs past the end of the message")
    try:
        return payload[offset:end].decode("utf-8"), end
    except UnicodeDecodeError:
        raise WireError(f"{what} is not UTF-8") from None


def encode_waiting(sender: bytes, waiting: Mapping[str, Sequence[tuple[int, int]]]) -> bytes:
    """One waiting report: the first :data:`MAX_WAITERS` order keys (-priority, arrival Unix
    ms) of each policy's queue in ``waiting`` (policies without waiters are left out)."""
    if len(sender) != SENDER_ID_BYTES:
        raise WireError(f"sender id must be {SENDER_ID_BYTES} bytes, got {len(sender)}")
    queues = [(key, list(keys)[:MAX_WAITERS]) for key, keys in waiting.items() if keys]
    if len(queues) > MAX_POLICIES:
        raise WireError(f"{len(queues)} policies, more than {MAX_POLICIES}")
    parts = [_HEADER.pack(WAITING_MAGIC, WAITING_VERSION, sender, len(queues))]
    for key, keys in queues:
        name = _name(key, "policy key")
        parts += [_U16.pack(len(name)), name, _U16.pack(len(keys))]
        for rank, arrival_ms in keys:
            if not (-(1 << 63) <= rank < 1 << 63 and 0 <= arrival_ms < 1 << 64):
                raise WireError(f"waiter ({rank}, {arrival_ms}) does not fit the message")
            parts.append(_WAITER.pack(rank, arrival_ms))
    return b"".join(parts)


def decode_waiting(payload: bytes) -> tuple[bytes, dict[str, list[tuple[int, int]]]]:
    """The sender id and its waiters' order keys by policy key; :class:`WireError` if the
    report breaks a rule."""
    version, sender, count = _header(payload, WAITING_MAGIC, "a waiting report")
    if version != WAITING_VERSION:
        raise WireError(f"waiting report version {version}, this router reads "
                        f"{WAITING_VERSION}")
    if count > MAX_POLICIES:
        raise WireError(f"{count} policies, more than {MAX_POLICIES}")
    offset = _HEADER.size
    waiting: dict[str, list[tuple[int, int]]] = {}
    for _ in range(count):
        key, offset = _read_name(payload, offset, "policy key")
        waiters, offset = _read(payload, offset, _U16, "waiter count")
        if not 0 < waiters <= MAX_WAITERS:
            raise WireError(f"{waiters} waiters, not 1 to {MAX_WAITERS}")
        end = offset + _WAITER.size * waiters
        if end > len(payload):
            raise WireError("waiters run past the end of the message")
        if key in waiting:
            raise WireError(f"policy {key!r} twice in one report")
        waiting[key] = [(int(rank), int(arrival)) for rank, arrival
                        in _WAITER.iter_unpack(payload[offset:end])]
        offset = end
    if offset != len(payload):
        raise WireError(f"{len(payload) - offset} trailing bytes after the last policy")
    return sender, waiting


__all__ = ["ANSWERED", "BACKLOG", "COMPUTES", "HELD", "MAX_BLOCKS", "MAX_MESSAGE_BYTES",
           "MAX_POLICIES", "MAX_RECORDS", "MAX_WAITERS", "PRIORITY", "STARTED", "VERSION",
           "WAITING_MAGIC", "DispatchRecord", "WireError", "decode", "decode_waiting", "encode",
           "encode_waiting"]
