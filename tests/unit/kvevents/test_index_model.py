"""The prefix index against a plain model of what it promises, under random operations.

The index keeps its state in shared bitmask maps and walks them with tricks for speed; the
model keeps one dictionary of blocks (least recently stored or touched first), one of pending
marks and one of doomed blocks (the eviction forecast) per endpoint and answers ``match`` the
slow, obvious way. Any sequence of stores, removes, pending marks with and without a capacity,
clears, endpoint removals and clock steps must leave both giving the same answers and counting
the same forecasts.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from kvroute_router.kvevents.index import FORECAST_EXPIRY_PASSES, PrefixIndex

ENDPOINTS = ["a", "b", "c"]
MAX_BLOCKS = 6
MAX_PENDING = 4
TTL = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Model:
    """Per endpoint: block → references (least recently stored or touched first), block →
    pending expiry (expired marks are purged by a match), doomed block → (references,
    expiry), and the forecast counts (doomed, confirmed, restored). Unconfirmed forecasts
    come back in passes, at most ``FORECAST_EXPIRY_PASSES`` per ``TTL``, run by a match."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.blocks: dict[str, dict[int, int]] = {}
        self.pending: dict[str, dict[int, float]] = {}
        self.doomed: dict[str, dict[int, tuple[int, float]]] = {}
        self.counts: dict[str, list[int]] = {}
        self.next_pass = float("inf")

    def _add(self, endpoint: str) -> None:
        self.blocks.setdefault(endpoint, {})
        self.pending.setdefault(endpoint, {})
        self.doomed.setdefault(endpoint, {})
        self.counts.setdefault(endpoint, [0, 0, 0])

    def store(self, endpoint: str, hashes: list[int]) -> None:
        self._add(endpoint)
        blocks = self.blocks[endpoint]
        for block in hashes:
            self.pending[endpoint].pop(block, None)
            if block not in blocks and block in self.doomed[endpoint]:  # the engine kept it
                blocks[block] = self.doomed[endpoint].pop(block)[0]
                self.counts[endpoint][2] += 1
            blocks[block] = blocks.pop(block, 0) + 1
        while len(blocks) > MAX_BLOCKS:
            del blocks[next(iter(blocks))]

    def remove(self, endpoint: str, hashes: list[int]) -> None:
        if endpoint not in self.blocks:
            return
        blocks = self.blocks[endpoint]
        doomed = self.doomed[endpoint]
        for block in hashes:
            self.pending[endpoint].pop(block, None)
            if block in blocks:
                blocks[block] -= 1
                if not blocks[block]:
                    del blocks[block]
            elif block in doomed:  # the engine confirms the forecast eviction
                references, expiry = doomed.pop(block)
                if references > 1:
                    doomed[block] = (references - 1, expiry)
                else:
                    self.counts[endpoint][1] += 1

    def mark(self, endpoint: str, hashes: list[int]) -> None:
        self._add(endpoint)
        pending = self.pending[endpoint]
        for block in hashes:
            if block not in self.blocks[endpoint]:
                pending.pop(block, None)
                pending[block] = self.clock() + TTL
        while len(pending) > MAX_PENDING:
            del pending[next(iter(pending))]

    def forecast(self, endpoint: str, hashes: list[int], capacity: int) -> None:
        """A dispatch with the endpoint's capacity: touch the held blocks (the prompt's head
        most recent), mark the rest, doom the least recent beyond the capacity."""
        self._add(endpoint)
        blocks = self.blocks[endpoint]
        held = [block for block in reversed(hashes) if block in blocks]
        for block in held:
            blocks[block] = blocks.pop(block)
        self.mark(endpoint, hashes)
        excess = min(len(blocks) + len(self.pending[endpoint]) - capacity,
                     len(blocks) - len(held))
        expiry = self.clock() + TTL
        for block in list(blocks)[:max(excess, 0)]:
            self.doomed[endpoint][block] = (blocks.pop(block), expiry)
            self.counts[endpoint][0] += 1
        if excess > 0:
            self.next_pass = min(self.next_pass, expiry)

    def clear(self, endpoint: str) -> None:
        if endpoint in self.blocks:
            self.blocks[endpoint].clear()
            self.pending[endpoint].clear()
            self.doomed[endpoint].clear()

    def drop(self, endpoint: str) -> None:
        for state in (self.blocks, self.pending, self.doomed, self.counts):
            state.pop(endpoint, None)

    def restore_pass(self) -> None:
        now = self.clock()
        if now < self.next_pass:
            return
        for endpoint, doomed in self.doomed.items():
            back = {block: references for block, (references, expiry) in doomed.items()
                    if expiry <= now}
            for block in back:
                del doomed[block]
            self.counts[endpoint][2] += len(back)
            self.blocks[endpoint] = back | self.blocks[endpoint]
        left = [expiry for doomed in self.doomed.values() for _, expiry in doomed.values()]
        self.next_pass = max(min(left, default=float("inf")),
                             now + TTL / FORECAST_EXPIRY_PASSES)

    def match(self, prompt: list[int], endpoints: list[str] | None) -> dict[str, int]:
        for pending in self.pending.values():
            for block in [b for b, expiry in pending.items() if expiry <= self.clock()]:
                del pending[block]
        self.restore_pass()
        wanted = list(self.blocks) if endpoints is None else endpoints
        result = {}
        for endpoint in wanted:
            blocks = self.blocks.get(endpoint, {})
            pending = self.pending.get(endpoint, {})
            depth = 0
            for block in prompt:
                if block not in blocks and pending.get(block, 0.0) <= self.clock():
                    break
                depth += 1
            result[endpoint] = depth
        return result


BLOCK = st.integers(0, 5)
OPS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["store", "remove", "mark"]), st.sampled_from(ENDPOINTS),
              st.lists(BLOCK, max_size=6)),
    st.tuples(st.just("forecast"), st.sampled_from(ENDPOINTS),
              st.lists(BLOCK, max_size=6, unique=True), st.integers(1, 8)),
    st.tuples(st.sampled_from(["clear", "drop"]), st.sampled_from(ENDPOINTS)),
    st.tuples(st.just("tick"), st.sampled_from([0.5, 2.0, 5.0])),
    st.tuples(st.just("match"), st.lists(BLOCK, max_size=8),
              st.one_of(st.none(), st.lists(st.sampled_from([*ENDPOINTS, "z"]), unique=True))),
), max_size=40)


@settings(max_examples=400, deadline=None)
@given(ops=OPS)
@example(ops=[("mark", "a", [1]), ("store", "a", [1]), ("remove", "a", [1]),
              ("match", [1], None)])  # a confirmed mark must not outlive its block
@example(ops=[("store", "a", [1, 2, 3]), ("forecast", "a", [4], 3), ("tick", 5.0),
              ("match", [1], None), ("forecast", "a", [5], 3), ("match", [1], None),
              ("match", [2], None)])  # an unconfirmed forecast comes back least recent
def test_the_index_answers_as_the_plain_model_does(ops: list[tuple[Any, ...]]) -> None:
    clock = Clock()
    index = PrefixIndex(MAX_BLOCKS, pending_ttl=TTL, max_pending_per_endpoint=MAX_PENDING,
                        forecast_evictions=True, clock=clock)
    model = Model(clock)
    for op in ops:
        kind = op[0]
        if kind == "store":
            index.store(op[1], op[2])
            model.store(op[1], op[2])
        elif kind == "remove":
            index.remove(op[1], op[2])
            model.remove(op[1], op[2])
        elif kind == "mark":
            index.mark_pending(op[1], op[2])
            model.mark(op[1], op[2])
        elif kind == "forecast":
            index.mark_pending(op[1], op[2], op[3])
            model.forecast(op[1], op[2], op[3])
        elif kind == "clear":
            index.clear(op[1])
            model.clear(op[1])
        elif kind == "drop":
            index.remove_endpoint(op[1])
            model.drop(op[1])
        elif kind == "tick":
            clock.now += op[1]
        else:
            assert index.match(op[1], op[2]) == model.match(op[1], op[2])
    for endpoint in ENDPOINTS:
        assert index.block_count(endpoint) == len(model.blocks.get(endpoint, {}))
    assert index.forecast_counts() == {endpoint: tuple(counts)
                                       for endpoint, counts in model.counts.items()}
    held = Counter(block for blocks in model.blocks.values() for block in blocks)
    assert index.distinct_blocks() == len(held)
    for endpoint in list(model.blocks):
        for block in range(6):
            assert index.holds(endpoint, block) == (block in model.blocks[endpoint])
            assert index.is_pending(endpoint, block) == \
                (model.pending[endpoint].get(block, 0.0) > clock())
