"""Unit tests of the block hasher's own rules (the golden tests compare it with vLLM)."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvroute_router.kvevents.hashing import (
    BlockHashConfig,
    BlockHasher,
    resolve_seed,
    to_event_int,
)


def test_design_test_vector() -> None:
    hasher = BlockHasher(BlockHashConfig(block_size=16))
    assert hasher.block_hashes(list(range(1, 33))) == [8866452693264111234, 807986237951177663]


def test_only_full_blocks_are_hashed() -> None:
    hasher = BlockHasher(BlockHashConfig(block_size=16))
    assert hasher.block_hashes(list(range(1, 48))) == hasher.block_hashes(list(range(1, 33)))
    assert hasher.block_hashes(list(range(15))) == []


def test_seed_rule() -> None:
    assert resolve_seed(None) == "vllm-none-hash"
    assert resolve_seed("0") == "0"
    default = BlockHasher(BlockHashConfig(block_size=4))
    seeded = BlockHasher(BlockHashConfig(block_size=4, seed="0"))
    assert default.block_hashes([1, 2, 3, 4]) != seeded.block_hashes([1, 2, 3, 4])


def test_extra_keys_change_every_later_block() -> None:
    hasher = BlockHasher(BlockHashConfig(block_size=4))
    tokens = list(range(12))
    plain = hasher.block_hashes(tokens)
    salted = hasher.block_hashes(tokens, cache_salt="tenant")
    lora = hasher.block_hashes(tokens, lora=("adapter", "/a"))
    assert all(a != b for a, b in zip(plain, salted, strict=True))
    assert all(a != b for a, b in zip(plain, lora, strict=True))
    assert hasher.block_hashes(tokens, cache_salt="") == plain


def test_unsupported_algorithm_is_named() -> None:
    with pytest.raises(ValueError, match="xxhash"):
        BlockHashConfig(block_size=16, algorithm="xxhash")  # type: ignore[arg-type]


@given(st.lists(st.integers(min_value=0, max_value=2**40), max_size=40),
       st.binary(min_size=32, max_size=32))
def test_hand_written_cbor_equals_cbor2(tokens: list[int], parent: bytes) -> None:
    hasher = BlockHasher(BlockHashConfig(block_size=max(1, len(tokens))))
    assert hasher.hash_block(parent, tokens) == hasher.hash_object((parent, tuple(tokens), None))


def test_event_int_is_last_eight_bytes() -> None:
    digest = bytes(range(32))
    assert to_event_int(digest) == int.from_bytes(bytes(range(24, 32)), "big")
    assert cbor2.dumps(1) == b"\x01"
