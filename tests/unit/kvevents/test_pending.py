"""Pending blocks: a dispatched prompt counts as held on its endpoint until events settle it.

Deterministic: the index reads an injected clock, no sleeping and no timing thresholds.
"""

from __future__ import annotations

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.request import LLMRequest
from kvroute_router.kvevents.hashing import BlockHashConfig
from kvroute_router.kvevents.hub import PoolKVEvents
from kvroute_router.kvevents.index import PrefixIndex
from kvroute_router.plugins.prefix_approx import ApproxPrefixIndex, ApproxPrefixScorer
from kvroute_router.plugins.prefix_precise import PrecisePrefixScorer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TrustedEvents(PoolKVEvents):
    """Every endpoint's subscriber counts as in sequence (no sockets in a unit test)."""

    def trustworthy(self, endpoint: str) -> bool:
        return True


def _index(clock: FakeClock, max_pending_per_endpoint: int = 1 << 16) -> PrefixIndex:
    return PrefixIndex(pending_ttl=5.0, clock=clock,
                       max_pending_per_endpoint=max_pending_per_endpoint)


def test_pending_blocks_count_as_held_until_they_expire() -> None:
    clock = FakeClock()
    index = _index(clock)
    index.add_endpoint("b")
    assert index.mark_pending("a", [1, 2, 3]) == 3
    assert index.match([1, 2, 3, 4], ["a", "b"]) == {"a": 3, "b": 0}
    clock.now += 4.9
    assert index.match([1, 2, 3], ["a"]) == {"a": 3}
    clock.now += 0.1  # exactly at the expiry: gone
    assert index.match([1, 2, 3], ["a"]) == {"a": 0}
    assert index.pending_count("a") == 0
    assert index.distinct_blocks() == 0


def test_remarking_extends_the_expiry_and_keeps_expiry_order() -> None:
    clock = FakeClock()
    index = _index(clock)
    index.mark_pending("a", [1, 2])
    clock.now += 3
    index.mark_pending("a", [1])  # block 1 now expires at +8, block 2 still at +5
    clock.now += 2.5
    assert index.is_pending("a", 1) and not index.is_pending("a", 2)
    assert index.match([1, 2], ["a"]) == {"a": 1}
    assert index.pending_count("a") == 1


def test_published_and_pending_blocks_make_one_consecutive_prefix() -> None:
    clock = FakeClock()
    index = _index(clock)
    index.store("a", [1, 2])
    assert index.mark_pending("a", [1, 2, 3, 4]) == 2  # published blocks are not re-marked
    index.mark_pending("a", [6])
    assert index.match([1, 2, 3, 4, 5, 6], ["a"]) == {"a": 4}  # stops at the gap (5)


def test_events_clear_pending_marks() -> None:
    clock = FakeClock()
    index = _index(clock)
    index.mark_pending("a", [1, 2, 3])
    index.store("a", [1])  # published: the real entry takes over
    assert not index.is_pending("a", 1) and index.holds("a", 1)
    index.remove("a", [2])  # BlockRemoved for a block never published: mark dropped
    assert index.match([1, 2, 3], ["a"]) == {"a": 1}
    assert index.is_pending("a", 3)
    index.clear("a")  # restart / AllBlocksCleared
    assert index.pending_count("a") == 0
    assert index.match([3], ["a"]) == {"a": 0}
    index.mark_pending("a", [7])
    index.remove_endpoint("a")
    index.add_endpoint("c")  # reuses the slot: must not inherit the mark
    assert index.match([7], ["c"]) == {"c": 0}


def test_pending_marks_are_bounded_per_endpoint() -> None:
    clock = FakeClock()
    index = _index(clock, max_pending_per_endpoint=3)
    index.mark_pending("a", [1, 2, 3, 4, 5])
    assert index.pending_count("a") == 3
    assert index.match([3, 4, 5], ["a"]) == {"a": 3}
    assert index.match([1], ["a"]) == {"a": 0}
    assert PrefixIndex(max_pending_per_endpoint=0).mark_pending("a", [1]) == 0


def _scorer(clock: FakeClock) -> tuple[PrecisePrefixScorer, TrustedEvents]:
    events = TrustedEvents(BlockHashConfig(block_size=4))
    events.index.clock = clock
    return PrecisePrefixScorer(events, ApproxPrefixScorer(ApproxPrefixIndex(), 8, 4)), events


ENDPOINTS = [Endpoint(name="a", address="127.0.0.1:1", pool="p"),
             Endpoint(name="b", address="127.0.0.1:2", pool="p")]


def test_second_identical_request_before_any_event_scores_the_first_endpoint() -> None:
    clock = FakeClock()
    scorer, events = _scorer(clock)
    request = LLMRequest(model="m", token_ids=list(range(16)))
    first = CycleState()
    assert scorer.score(first, request, ENDPOINTS) == [0.0, 0.0]
    scorer.on_dispatch(first, request, ENDPOINTS[1])
    # No BlockStored yet (the first request is still prefilling).
    assert events.index.block_count("b") == 0
    assert scorer.score(CycleState(), request, ENDPOINTS) == [0.0, 1.0]
    longer = LLMRequest(model="m", token_ids=list(range(24)))  # same prefix, two more blocks
    assert scorer.score(CycleState(), longer, ENDPOINTS) == [0.0, 4 / 6]
    # The engine publishes the blocks: still held, now for real.
    events.index.store("b", events.hasher.block_hashes(list(range(16))))
    assert events.index.pending_count("b") == 0
    clock.now += 60
    assert scorer.score(CycleState(), request, ENDPOINTS) == [0.0, 1.0]


def test_dispatch_marks_expire_and_removal_clears_them_through_the_scorer() -> None:
    clock = FakeClock()
    scorer, events = _scorer(clock)
    request = LLMRequest(model="m", token_ids=list(range(16)))
    state = CycleState()
    scorer.score(state, request, ENDPOINTS)
    scorer.on_dispatch(state, request, ENDPOINTS[0])
    assert scorer.score(CycleState(), request, ENDPOINTS) == [1.0, 0.0]
    clock.now += events.index.pending_ttl
    assert scorer.score(CycleState(), request, ENDPOINTS) == [0.0, 0.0]
    scorer.on_dispatch(state, request, ENDPOINTS[0])
    hashes = events.hasher.block_hashes(list(range(16)))
    events.index.remove("a", hashes[1:2])  # the engine dropped block 1 (e.g. aborted request)
    assert scorer.score(CycleState(), request, ENDPOINTS) == [0.25, 0.0]


def test_untrusted_endpoints_get_no_pending_marks() -> None:
    events = PoolKVEvents(BlockHashConfig(block_size=4))  # no subscribers: nothing trusted
    scorer = PrecisePrefixScorer(events, ApproxPrefixScorer(ApproxPrefixIndex(), 8, 4))
    request = LLMRequest(model="m", token_ids=list(range(16)))
    scorer.on_dispatch(CycleState(), request, ENDPOINTS[0])
    assert events.index.pending_count("a") == 0
    assert events.index.endpoints() == []
