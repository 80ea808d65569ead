"""``bench/kv_ingest.py``: its batches are what the emulator publishes for one request, and the
subscriber's apply path indexes them (an engine at capacity: the last stored blocks only)."""

from __future__ import annotations

import kv_ingest
from kvroute_router.kvevents.events import BlockRemoved, BlockStored, decode_batch


def test_batches_store_a_chain_and_evict_what_was_stored_eight_batches_before() -> None:
    payloads = kv_ingest.batches(12, blocks=5, block_size=4, vocab=128_000, seed=1)
    decoded = [decode_batch(seq, payload) for seq, payload in enumerate(payloads)]
    stored = [b.events[0] for b in decoded]
    assert all(isinstance(e, BlockStored) and len(e.block_hashes) == 5 for e in stored)
    assert all(isinstance(e, BlockStored) and len(e.tokens() or []) == 20 for e in stored)
    assert [len(b.events) for b in decoded] == [1] * 8 + [2] * 4
    removed, first = decoded[8].events[1], stored[0]
    assert isinstance(removed, BlockRemoved) and isinstance(first, BlockStored)
    assert removed.block_hashes == first.block_hashes


def test_applying_them_leaves_the_index_at_the_engines_size() -> None:
    payloads = kv_ingest.batches(12, blocks=5, block_size=4, vocab=256, seed=2)
    follower = kv_ingest.subscriber(block_size=4, self_check=True)
    for seq, payload in enumerate(payloads):
        follower._apply(seq, payload, "live")
    assert follower.index.block_count("engine-0:8000") == 8 * 5
    assert follower.status.batches_applied == 12 and follower.status.dropped == 0
    assert all(value > 0 for value in kv_ingest.measure(payloads, 4, False, rounds=2))
