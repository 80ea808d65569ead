"""The approximate prefix history: chained block keys, longest-prefix matches, bounded LRU."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from kvroute_router.plugins.prefix_approx import (
    ApproxPrefixIndex,
    text_block_keys,
    token_block_keys,
)


def test_keys_chain_and_cover_only_full_blocks() -> None:
    a = text_block_keys("x" * 100, 32)
    b = text_block_keys("x" * 64 + "y" * 36, 32)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert text_block_keys("short", 32) == []
    # Same block content at a different depth gets a different key.
    assert len(set(text_block_keys("z" * 96, 32))) == 3
    assert token_block_keys(list(range(64)), 32) != token_block_keys(list(range(1, 65)), 32)


def test_match_is_the_longest_recorded_prefix() -> None:
    index = ApproxPrefixIndex()
    keys = text_block_keys("abcd" * 64, 16)  # 16 blocks
    index.record("e0", keys[:10])
    index.record("e1", keys[:4])
    assert index.match(keys, ["e0", "e1", "e2"]) == {"e0": 10, "e1": 4}
    other = text_block_keys("zzzz" * 64, 16)
    assert index.match(other, ["e0", "e1"]) == {}


def test_lru_bounds_memory_and_forget_drops_everything() -> None:
    index = ApproxPrefixIndex(max_blocks_per_endpoint=8)
    for i in range(20):
        index.record("e0", text_block_keys(f"{i:04d}" * 16, 16))
    assert index.blocks("e0") == 8
    index.forget("e0")
    assert index.blocks() == 0 and not index._holders


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=200), min_size=1, max_size=20),
       st.integers(min_value=1, max_value=16))
def test_holders_stay_consistent_with_lrus(prompts: list[str], capacity: int) -> None:
    index = ApproxPrefixIndex(max_blocks_per_endpoint=capacity)
    for i, prompt in enumerate(prompts):
        index.record(f"e{i % 3}", text_block_keys(prompt, 8))
    for name, lru in index._lru.items():
        assert len(lru) <= capacity
        for key in lru:
            assert name in index._holders[key]
    for key, holders in index._holders.items():
        assert holders and all(key in index._lru[h] for h in holders)


def _linear_depth(index: ApproxPrefixIndex, keys: list[int], name: str) -> int:
    depth = 0
    for key in keys:
        if name not in index._holders.get(key, {}):
            break
        depth += 1
    return depth


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(1, 12)),
                min_size=1, max_size=40),
       st.integers(min_value=1, max_value=24))
def test_binary_search_match_equals_a_linear_walk(records: list[tuple[int, int, int]],
                                                  capacity: int) -> None:
    # Prompts share prefixes (family f, length n blocks); LRU eviction must keep holding
    # monotone along each prompt so the binary search finds the same depth as a walk.
    index = ApproxPrefixIndex(max_blocks_per_endpoint=capacity)
    prompts = {f: text_block_keys("".join(f"{f}{i:03d}" for i in range(12)), 4)
               for f in range(6)}
    for endpoint, family, blocks in records:
        index.record(f"e{endpoint}", prompts[family][:blocks])
    for keys in prompts.values():
        matched = index.match(keys, [f"e{i}" for i in range(4)])
        for i in range(4):
            assert matched.get(f"e{i}", 0) == _linear_depth(index, keys, f"e{i}")
