"""The hash self-check's verdicts, and what it decodes to reach them."""

from __future__ import annotations

import msgspec
import pytest
from kvroute_router.kvevents.events import BlockStored
from kvroute_router.kvevents.hashing import BlockHashConfig, BlockHasher
from kvroute_router.kvevents.selfcheck import BlockHashSelfCheck

from .test_subscriber import BLOCK, stored


def _event(fields: dict[str, object]) -> BlockStored:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(fields), type=BlockStored)


def test_a_continuation_of_a_chain_the_check_never_computed_is_not_decoded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hasher = BlockHasher(BlockHashConfig(BLOCK))
    tokens = list(range(3 * BLOCK))
    hashes = hasher.block_hashes(tokens)
    root = _event(stored(hasher, tokens[:BLOCK]))
    known_parent = _event({**stored(hasher, tokens[BLOCK:2 * BLOCK]),
                           "block_hashes": [hashes[1]], "parent_block_hash": hashes[0]})
    unknown_parent = _event({**stored(hasher, tokens[2 * BLOCK:]),
                             "block_hashes": [hashes[2]], "parent_block_hash": 12345})
    decoded: list[BlockStored] = []
    real_tokens = BlockStored.tokens

    def counting_tokens(event: BlockStored) -> list[int] | None:
        decoded.append(event)
        return real_tokens(event)

    monkeypatch.setattr(BlockStored, "tokens", counting_tokens)
    check = BlockHashSelfCheck("engine-0", hasher, sample_every=1)

    assert check.check(unknown_parent) == "unverifiable"
    assert decoded == []  # the parent is unknown: no token id is read
    assert check.check(root) == "match"
    assert check.check(known_parent) == "match"  # chained to a digest the check computed
    assert decoded == [root, known_parent]
    assert check.check(unknown_parent) == "unverifiable"
    assert len(decoded) == 2
    assert check.status.matched == 2 and check.status.unverifiable == 2
    assert check.status.state == "ok"


def test_a_chained_event_of_another_block_size_is_still_read_for_the_alarm() -> None:
    # The shortcut above is only for the engine's own block size: a different size is the
    # alarm's business, and the check reads the event as it always did.
    hasher = BlockHasher(BlockHashConfig(BLOCK))
    tokens = list(range(2 * BLOCK))
    event = _event({**stored(hasher, tokens), "block_hashes": [1],
                    "parent_block_hash": 12345, "block_size": 2 * BLOCK})
    check = BlockHashSelfCheck("engine-0", hasher, sample_every=1)
    assert check.check(event) == "mismatch"
    assert check.status.state == "mismatch"
