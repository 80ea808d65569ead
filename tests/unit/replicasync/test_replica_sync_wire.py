"""The replica-sync message format: what one replica publishes the others decode exactly, and
anything else — truncated, oversized, stray bytes from another publisher — is rejected whole
with a reason, never another exception."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvroute_router.replicasync.wire import (
    ANSWERED,
    BACKLOG,
    COMPUTES,
    HELD,
    MAX_BLOCKS,
    MAX_MESSAGE_BYTES,
    MAX_RECORDS,
    PRIORITY,
    STARTED,
    VERSION,
    DispatchRecord,
    WireError,
    decode,
    encode,
)

SENDER = bytes(range(16))

names = st.text(min_size=0, max_size=40)
hashes = st.lists(st.integers(0, 2**64 - 1), max_size=50).map(tuple)
dispatches = st.builds(DispatchRecord, names, names, hashes)
computing = st.builds(  # a dispatch computing a prefix it registered, FCFS or priority
    lambda pool, ep, blocks, priority: DispatchRecord(pool, ep, blocks, computes=True,
                                                      priority=priority),
    names, names, hashes.filter(bool), st.none() | st.integers(-2**63, 2**63 - 1))
answered = st.builds(lambda pool, ep, first: DispatchRecord(pool, ep, (first,), answered=True),
                     names, names, st.integers(0, 2**64 - 1))
ids = st.integers(0, 2**32 - 1)
with_backlog = st.builds(  # a dispatch leaving prompt tokens to compute, computing or not
    lambda record, dispatch_id, tokens: DispatchRecord(
        record.pool_key, record.endpoint, record.blocks, computes=record.computes,
        priority=record.priority, dispatch_id=dispatch_id, tokens=tokens),
    dispatches | computing, ids, st.integers(1, 2**32 - 1))
backlog_answered = st.builds(  # the end of a dispatch's backlog, and of its prefix or not
    lambda pool, ep, first, dispatch_id: DispatchRecord(pool, ep, first, answered=True,
                                                        dispatch_id=dispatch_id),
    names, names, st.just(()) | st.tuples(st.integers(0, 2**64 - 1)), ids)
holding = st.builds(  # a dispatch that found part of its prompt held, with any of the above
    lambda record, held: DispatchRecord(
        record.pool_key, record.endpoint, record.blocks, computes=record.computes,
        priority=record.priority, dispatch_id=record.dispatch_id, tokens=record.tokens,
        held=held),
    dispatches | computing | with_backlog, hashes.filter(bool))
started = st.builds(  # an attempt's first byte, with or without a prefix or backlog to end
    lambda pool, ep, first, dispatch_id: DispatchRecord(pool, ep, first, answered=True,
                                                        dispatch_id=dispatch_id, started=True),
    names, names, st.just(()) | st.tuples(st.integers(0, 2**64 - 1)), st.none() | ids)
records = (dispatches | computing | answered | with_backlog | backlog_answered | holding
           | started)


@given(st.lists(records, max_size=20))
def test_what_is_encoded_decodes_to_the_same_records(batch: list[DispatchRecord]) -> None:
    assert decode(encode(SENDER, batch)) == (SENDER, batch)


def test_an_empty_block_list_still_counts_one_dispatch() -> None:
    _, decoded = decode(encode(SENDER, [DispatchRecord("ns/pool", "pod-0")]))
    assert decoded == [DispatchRecord("ns/pool", "pod-0", ())]


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_random_bytes_are_rejected_with_wire_error_only(payload: bytes) -> None:
    with contextlib.suppress(WireError):
        decode(payload)


@given(st.lists(records, min_size=1, max_size=5), st.data())
def test_every_truncation_of_a_valid_message_is_rejected(batch: list[DispatchRecord],
                                                          data: st.DataObject) -> None:
    payload = encode(SENDER, batch)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(WireError):
        decode(payload[:cut])


def _header(count: int, magic: bytes = b"KVRS", version: int = 1) -> bytes:
    return struct.pack(">4sB16sH", magic, version, SENDER, count)


def _record(flags: int, blocks: int, extra: bytes = b"", version: int = 2) -> bytes:
    """One flagged record (``extra``: the priority and/or dispatch id and tokens)."""
    return (_header(1, version=version) + struct.pack(">H", 1) + b"p" + struct.pack(">H", 1)
            + b"e" + struct.pack(">B", flags) + extra + struct.pack(">I", blocks)
            + b"\x00" * 8 * blocks)


def _v3(flags: int, blocks: int, *id_tokens: int) -> bytes:
    """A version-3 record; ``id_tokens``: its dispatch id and tokens (or a truncated part)."""
    return _record(flags, blocks, struct.pack(f">{len(id_tokens)}I", *id_tokens), version=3)


def test_a_message_without_flags_is_written_as_version_1() -> None:
    """Replicas reading only version 1 keep taking an FCFS fleet's messages during a rolling
    upgrade; a message with a flagged record is version 2."""
    plain = encode(SENDER, [DispatchRecord("ns/pool", "pod-0", (1, 2))])
    assert plain[4] == 1
    assert plain == _header(1) + struct.pack(">H", 7) + b"ns/pool" + struct.pack(">H", 5) \
        + b"pod-0" + struct.pack(">I", 2) + struct.pack(">2Q", 1, 2)
    flagged = encode(SENDER, [DispatchRecord("ns/pool", "pod-0", (1, 2)),
                              DispatchRecord("ns/pool", "pod-0", (3,), computes=True,
                                             priority=-5)])
    assert flagged[4] == 2
    backlog = encode(SENDER, [DispatchRecord("p", "e", (1,), dispatch_id=0, tokens=16)])
    assert backlog[4] == 3
    held = encode(SENDER, [DispatchRecord("p", "e", (1,), dispatch_id=0, tokens=16,
                                          held=(7, 8))])
    assert held[4] == 4
    first_byte = encode(SENDER, [DispatchRecord("p", "e", (1,), dispatch_id=0, tokens=16,
                                                held=(7, 8)),
                                 DispatchRecord("p", "e", answered=True, started=True)])
    assert first_byte[4] == VERSION == 5
    assert decode(first_byte)[1][1] == DispatchRecord("p", "e", answered=True, started=True)
    assert decode(held)[1] == [DispatchRecord("p", "e", (1,), dispatch_id=0, tokens=16,
                                              held=(7, 8))]
    assert decode(flagged)[1][1] == DispatchRecord("ns/pool", "pod-0", (3,), computes=True,
                                                   priority=-5)


@pytest.mark.parametrize(("payload", "reason"), [
    (_header(0, magic=b"XXXX"), "bad magic"),
    (_header(0, version=6), "version 6"),
    (_record(STARTED | ANSWERED, 0, version=4), "unknown record flags 0x24 in version 4"),
    (_record(STARTED, 1, version=5), "started flag without the answered flag"),
    (_record(STARTED | ANSWERED | COMPUTES, 1, version=5), "one block, a dispatch id"),
    (_record(STARTED | ANSWERED, 2, version=5), "one block, a dispatch id"),
    (_record(HELD, 1, version=3), "unknown record flags 0x10 in version 3"),
    (_record(HELD, 1, struct.pack(">I", 0), version=4), "0 held blocks, not 1 to"),
    (_record(HELD, 1, struct.pack(">I", MAX_BLOCKS + 1), version=4), "held blocks, not 1 to"),
    (_record(HELD, 0, struct.pack(">I", 2) + b"\x00" * 8, version=4)[:-4],
     "held block hashes run past"),
    (_record(HELD | ANSWERED, 1, struct.pack(">IQ", 1, 5), version=4),
     "one block, a dispatch id"),
    (_record(8, 1), "unknown record flags 0x8 in version 2"),
    (_v3(16, 1), "unknown record flags 0x10"),
    (_record(ANSWERED, 2), "one block, a dispatch id"),
    (_record(ANSWERED, 0), "one block, a dispatch id"),
    (_record(ANSWERED | COMPUTES, 1), "one block, a dispatch id"),
    (_v3(ANSWERED | BACKLOG, 2, 1, 0), "one block, a dispatch id"),
    (_v3(ANSWERED | BACKLOG, 0, 1, 5), "no backlog tokens"),
    (_v3(BACKLOG, 1, 1, 0), "backlog record without tokens"),
    (_v3(BACKLOG, 0, 1)[:-4], "tokens runs past"),
    (_record(PRIORITY, 1, struct.pack(">q", 7)), "without the computes flag"),
    (_record(COMPUTES, 0), "computes record without blocks"),
    (_record(COMPUTES | PRIORITY, 1, struct.pack(">q", 7))[:-15], "priority runs past"),
    (_header(MAX_RECORDS + 1), "records, more than"),
    (_header(1) + struct.pack(">H", 600) + b"p" * 600, "pool key is 600 bytes"),
    (_header(1) + struct.pack(">H", 2) + b"\xff\xfe", "pool key is not UTF-8"),
    (_header(1) + struct.pack(">H", 1) + b"p" + struct.pack(">H", 1) + b"e"
     + struct.pack(">I", MAX_BLOCKS + 1), "blocks, more than"),
    (_header(1) + struct.pack(">H", 1) + b"p" + struct.pack(">H", 1) + b"e"
     + struct.pack(">I", 3) + b"\x00" * 16, "past the end"),
    (encode(SENDER, [DispatchRecord("p", "e", (1,))]) + b"\x00", "1 trailing bytes"),
    (b"\x00" * (MAX_MESSAGE_BYTES + 1), "more than"),
])
def test_each_broken_rule_is_named(payload: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        decode(payload)


def test_the_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(WireError, match="sender id"):
        encode(b"short", [])
    with pytest.raises(WireError, match="blocks, more than"):
        encode(SENDER, [DispatchRecord("p", "e", (0,) * (MAX_BLOCKS + 1))])
    with pytest.raises(WireError, match="endpoint name is"):
        encode(SENDER, [DispatchRecord("p", "e" * 513)])
    with pytest.raises(WireError, match="one block, a dispatch id"):
        encode(SENDER, [DispatchRecord("p", "e", (1, 2), answered=True)])
    with pytest.raises(WireError, match="one block, a dispatch id"):
        encode(SENDER, [DispatchRecord("p", "e", (), answered=True)])
    with pytest.raises(WireError, match="without tokens"):
        encode(SENDER, [DispatchRecord("p", "e", (1,), dispatch_id=3)])
    with pytest.raises(WireError, match="32-bit unsigned"):
        encode(SENDER, [DispatchRecord("p", "e", (1,), dispatch_id=2**32, tokens=1)])
    with pytest.raises(WireError, match="without blocks"):
        encode(SENDER, [DispatchRecord("p", "e", (), computes=True)])
    with pytest.raises(WireError, match="held blocks, more than"):
        encode(SENDER, [DispatchRecord("p", "e", (), held=(0,) * (MAX_BLOCKS + 1))])
    with pytest.raises(WireError, match="one block, a dispatch id"):
        encode(SENDER, [DispatchRecord("p", "e", (1,), answered=True, held=(2,))])
    with pytest.raises(WireError, match="not a 64-bit integer"):
        encode(SENDER, [DispatchRecord("p", "e", (1,), computes=True, priority=2**63)])
