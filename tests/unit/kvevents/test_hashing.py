"""Unit tests of the block hasher's own rules (the golden tests compare it with vLLM)."""

from __future__ import annotations

import hashlib
from array import array

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvroute_router.kvevents.hashing import (
    BlockHashConfig,
    BlockHasher,
    resolve_seed,
    to_event_int,
    to_event_ints,
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


def _reference(hasher: BlockHasher, tokens: list[int], salt: str | None = None,
               lora: tuple[str, str] | None = None) -> list[bytes]:
    """Block by block through ``hash_block`` (never memoised)."""
    size = hasher.block_size
    lora_keys: tuple[tuple[str, ...], ...] = (("lora", *lora),) if lora else ()
    out: list[bytes] = []
    parent: bytes | None = None
    for index in range(len(tokens) // size):
        keys = (*lora_keys, ("cache_salt", salt)) if index == 0 and salt else lora_keys
        parent = hasher.hash_block(parent, tokens[index * size:(index + 1) * size], keys or None)
        out.append(parent)
    return out


@pytest.mark.parametrize("algorithm", ["sha256_cbor", "sha256"])
@given(tokens=st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=80),
       block_size=st.integers(min_value=1, max_value=9),
       salt=st.one_of(st.none(), st.text(max_size=5)))
def test_memoised_chain_equals_block_by_block(algorithm: str, tokens: list[int],
                                              block_size: int, salt: str | None) -> None:
    hasher = BlockHasher(BlockHashConfig(block_size, algorithm))  # type: ignore[arg-type]
    expected = _reference(hasher, tokens, salt or None)
    assert hasher.block_digests(tokens, cache_salt=salt) == expected  # cold
    assert hasher.block_digests(tokens, cache_salt=salt) == expected  # from the memo
    longer = tokens + [7] * (2 * block_size)
    assert hasher.block_digests(longer, cache_salt=salt) == _reference(hasher, longer,
                                                                        salt or None)
    assert BlockHasher(hasher.config, memo_blocks=0).block_digests(
        tokens, cache_salt=salt) == expected


def test_memo_serves_repeats_and_extensions_only_hashing_new_blocks() -> None:
    hasher = BlockHasher(BlockHashConfig(block_size=16))  # memo runs of 8 blocks
    prompt = list(range(1000, 1000 + 16 * 16))
    first = hasher.block_hashes(prompt)
    assert hasher.memo_hits == 0 and hasher.memo_misses == 16
    assert hasher.block_hashes(prompt) == first
    assert hasher.memo_hits == 16 and hasher.memo_misses == 16
    extended = hasher.block_hashes(prompt + list(range(16 * 3)))
    assert extended[:16] == first and hasher.memo_hits == 32 and hasher.memo_misses == 19
    # a different salt changes block 0, so nothing after it can come from the memo
    salted = hasher.block_hashes(prompt, cache_salt="t")
    assert all(a != b for a, b in zip(salted, first, strict=True))
    assert hasher.memo_hits == 32


def test_memo_is_bounded_and_still_exact_after_eviction() -> None:
    hasher = BlockHasher(BlockHashConfig(block_size=4), memo_blocks=128)
    fresh = BlockHasher(BlockHashConfig(block_size=4), memo_blocks=0)
    prompts = [[seed * 1000 + i for i in range(4 * 40)] for seed in range(20)]
    for order in (prompts, prompts[::-1]):  # the second pass starts with memoised prompts
        for prompt in order:
            assert hasher.block_digests(prompt) == fresh.block_digests(prompt)
            assert hasher.memo_size() <= 128 + 32
    assert hasher.memo_hits > 0


def test_token_widths_do_not_share_memo_entries() -> None:
    """Prompts packed as 32-bit and as 64-bit ints name their blocks with different keys."""
    hasher = BlockHasher(BlockHashConfig(block_size=64))  # memo runs of 2 blocks
    small = list(range(256))
    big = [*small, 2**40, *range(127)]
    assert hasher.block_digests(small) == _reference(hasher, small)
    assert hasher.block_digests(big) == _reference(hasher, big)
    assert hasher.block_digests(big)[:4] == hasher.block_digests(small)


@pytest.mark.parametrize("algorithm", ["sha256_cbor", "sha256"])
@given(tokens=st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=200),
       block_size=st.integers(min_value=1, max_value=20))
def test_packed_ids_hash_as_their_list_does(algorithm: str, tokens: list[int],
                                            block_size: int) -> None:
    """The tokenizer hands out ``array('I')``: the same digests cold, and the memo entries a
    packed prompt leaves serve the same prompt as a list (and back)."""
    config = BlockHashConfig(block_size, algorithm)  # type: ignore[arg-type]
    packed = array("I", tokens)
    expected = _reference(BlockHasher(config, memo_blocks=0), tokens)
    for first, second in ((packed, tokens), (tokens, packed)):
        hasher = BlockHasher(config)
        assert hasher.block_digests(first) == expected
        misses = hasher.memo_misses
        assert hasher.block_digests(second) == expected
        assert hasher.memo_misses == misses  # every memoised run was found again
    assert BlockHasher(config, memo_blocks=0).block_digests(packed) == expected


def test_event_ints_batch_equals_one_by_one() -> None:
    digests = [bytes([i]) * 32 for i in range(5)] + [bytes(range(32))]
    assert to_event_ints(digests) == [to_event_int(d) for d in digests]
    assert to_event_ints([]) == []
    # Not all 32 bytes (even when the lengths add up to 32 each): one at a time.
    for odd in ([bytes(31), bytes(range(33))], [bytes(range(8))], [bytes(32), bytes(40)]):
        assert to_event_ints(odd) == [to_event_int(d) for d in odd]


def test_vectorised_encoding_equals_cbor2_at_every_width_boundary() -> None:
    edges = [0, 1, 23, 24, 25, 255, 256, 257, 65_535, 65_536, 65_537, 2**32 - 1, 2**32,
             2**32 + 1, 2**63 - 1, 2**63, 2**64 - 1]
    hasher = BlockHasher(BlockHashConfig(block_size=3), memo_blocks=0)
    for offset in range(3):  # every edge at every position of a block
        tokens = [0] * offset + edges + [5] * (3 - offset)
        assert hasher.block_digests(tokens) == _reference(hasher, tokens)
        assert hasher.block_digests(tokens[:offset + 15]) == _reference(hasher,
                                                                        tokens[:offset + 15])
    parent = hasher.none_hash
    for value in edges:
        assert hasher.hash_block(parent, [value, value, value]) == hashlib.sha256(
            cbor2.dumps((parent, (value, value, value), None), canonical=True)).digest()
