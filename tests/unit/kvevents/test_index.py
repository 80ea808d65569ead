"""PrefixIndex: reference counts, longest consecutive prefix, bounds, and bytes per entry."""

from __future__ import annotations

import tracemalloc

import pytest
from kvroute_router.kvevents.index import (
    COMPUTING,
    EVICTED,
    HELD,
    HELD_ELSEWHERE,
    NEW,
    PrefixIndex,
)


def test_match_is_longest_consecutive_prefix_per_endpoint() -> None:
    index = PrefixIndex()
    index.store("a", [1, 2, 3])
    index.store("b", [1, 2, 4, 5])
    index.store("c", [2, 3])
    assert index.match([1, 2, 3, 9]) == {"a": 3, "b": 2, "c": 0}
    assert index.match([1, 2, 4, 5, 6], endpoints=["b", "zz"]) == {"b": 4, "zz": 0}
    assert index.match([]) == {"a": 0, "b": 0, "c": 0}


def test_reference_counts_and_duplicates() -> None:
    index = PrefixIndex()
    assert index.store("a", [7, 7]) == 1
    assert index.remove("a", [7]) == 0
    assert index.holds("a", 7)
    assert index.remove("a", [7, 8]) == 1
    assert not index.holds("a", 7)
    assert index.distinct_blocks() == 0


def test_clear_and_remove_endpoint_free_slots() -> None:
    index = PrefixIndex()
    index.store("a", [1, 2])
    index.store("b", [1])
    assert index.clear("a") == 2
    assert index.match([1, 2]) == {"a": 0, "b": 1}
    index.remove_endpoint("b")
    index.store("c", [5])
    assert index.match([5]) == {"a": 0, "c": 1}
    assert index.distinct_blocks() == 1


def test_bound_evicts_least_recently_stored() -> None:
    index = PrefixIndex(max_blocks_per_endpoint=3)
    index.store("a", [1, 2, 3])
    index.store("a", [1])  # refreshed: now the newest
    index.store("a", [4])
    assert not index.holds("a", 2)
    assert all(index.holds("a", h) for h in (1, 3, 4))
    assert index.evicted_for_bound == 1
    with pytest.raises(ValueError, match="max_blocks_per_endpoint"):
        PrefixIndex(max_blocks_per_endpoint=0)


def test_bytes_per_entry_stays_small() -> None:
    """Measures the memory per (endpoint, block) entry documented in docs/kv-events.md."""
    blocks = 200_000
    hashes = [(i * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF for i in range(blocks)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = PrefixIndex()
    for start in range(0, blocks, 64):
        index.store("engine-a", hashes[start:start + 64])
        index.store("engine-b", hashes[start:start + 32])
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    per_entry = used / index.entries()
    print(f"index bytes per entry: {per_entry:.0f}")
    assert per_entry < 200


def test_dispatched_blocks_are_counted_by_where_they_stood() -> None:
    index = PrefixIndex()
    index.store("a", [1, 2, 3])
    index.store("b", [10, 11])
    index.remove("b", [11])  # evicted from the fleet
    index.mark_pending("a", [1, 2, 3, 4])  # three held, one new
    index.mark_pending("a", [1, 2, 3, 4])  # three held, one still being computed there
    index.mark_pending("a", [10, 11, 12])  # b publishes 10; 11 was evicted; 12 is new
    index.mark_pending("b", [4])  # a is computing it: a spill
    held, computing, elsewhere, evicted, new = HELD, COMPUTING, HELD_ELSEWHERE, EVICTED, NEW
    counts = index.dispatch_counts()
    assert counts["a"][held] == 6 and counts["a"][computing] == 1
    assert counts["a"][elsewhere] == 1 and counts["a"][evicted] == 1 and counts["a"][new] == 2
    assert counts["b"] == (0, 0, 1, 0, 0)


def test_the_evicted_blocks_remembered_are_bounded() -> None:
    index = PrefixIndex(max_evicted=1)
    index.store("a", [1, 2])
    index.remove("a", [1])
    index.remove("a", [2])  # 1 is forgotten: only the latest removal is remembered
    index.mark_pending("b", [1])
    index.mark_pending("c", [2])
    assert index.dispatch_counts()["b"] == (0, 0, 0, 0, 1)
    assert index.dispatch_counts()["c"] == (0, 0, 0, 1, 0)
