"""``prefix-approx``: the approximate prefix-cache scorer, from the router's own history.

The router remembers which prompt blocks it sent to which endpoint. A prompt is cut into
fixed-size blocks (``spec.scoring.prefixBlockChars`` characters of text, or whole multiples
of the pool's ``engine.blockSize`` of at least 64 tokens when the caller sent token ids);
block *i*'s key chains the key of block *i-1*, so a key stands for the whole prefix up to it,
as vLLM's own block hashes do. Only full blocks count (vLLM caches only full blocks). The score
of an endpoint is the share of the request's blocks that form a prefix it was sent before.

Memory is bounded: each endpoint keeps at most ``max_blocks_per_endpoint`` keys in LRU order,
and an endpoint's keys are dropped when it leaves the pool. The keys are Python ``hash`` values
of (parent key, block): 64-bit, process-local (history lives in memory only).
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.registry import PluginContext, SharedServices
from kvroute_router.framework.request import LLMRequest

DEFAULT_MAX_BLOCKS_PER_ENDPOINT = 32768
MIN_TOKEN_BLOCK = 64
TEXT_SEED = 0x6B76726F757465  # separates text-block keys from token-block keys
TOKEN_SEED = 0x746F6B656E73

STATE_BLOCKS = "prefix-approx/blocks"
STATE_MATCH = "prefix-approx/match"
"""CycleState keys: the request's block keys (list[int]) and matched blocks per endpoint name
(dict[str, int])."""


def text_block_keys(text: str, block_chars: int) -> list[int]:
    """Chained keys of the full ``block_chars``-character blocks of ``text``."""
    keys: list[int] = []
    parent = TEXT_SEED
    for start in range(0, len(text) - block_chars + 1, block_chars):
        parent = hash((parent, text[start:start + block_chars]))
        keys.append(parent)
    return keys


def token_block_keys(tokens: Sequence[int], block_size: int) -> list[int]:
    """Chained keys of the full ``block_size``-token blocks of ``tokens``."""
    try:
        data = array("Q", tokens).tobytes()
    except (OverflowError, TypeError):
        data = repr(list(tokens)).encode()  # not plain non-negative ints: still deterministic
        return text_block_keys(data.decode(), block_size * 8)
    width = 8 * block_size
    keys: list[int] = []
    parent = TOKEN_SEED
    for start in range(0, len(data) - width + 1, width):
        parent = hash((parent, data[start:start + width]))
        keys.append(parent)
    return keys


class ApproxPrefixIndex:
    """Which endpoints were sent which prefix blocks: key → holders, plus an LRU per endpoint."""

    def __init__(self, max_blocks_per_endpoint: int = DEFAULT_MAX_BLOCKS_PER_ENDPOINT) -> None:
        self.max_blocks_per_endpoint = max_blocks_per_endpoint
        self._holders: dict[int, dict[str, None]] = {}
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._lock = threading.Lock()

    def entries(self) -> int:
        """(endpoint, block) entries held now."""
        return sum(len(lru) for lru in list(self._lru.values()))

    def match(self, keys: Sequence[int], endpoints: Sequence[str]) -> dict[str, int]:
        """Blocks of the prefix each endpoint holds (only endpoints with at least one).

        Holding is monotone along a prompt (an endpoint that holds block *i* holds every block
        before it: ``record`` refreshes shallow blocks last, so LRU eviction removes deep
        blocks first), so each endpoint's depth is found by binary search over the keys."""
        if not keys:
            return {}
        holders_of = self._holders
        first = holders_of.get(keys[0])
        if not first:
            return {}
        wanted = set(endpoints)
        matched: dict[str, int] = {}
        total = len(keys)
        for name in first:
            if name not in wanted:
                continue
            low, high = 1, total  # invariant: holds keys[:low]; the answer is <= high
            while low < high:
                mid = (low + high + 1) // 2
                holders = holders_of.get(keys[mid - 1])
                if holders is not None and name in holders:
                    low = mid
                else:
                    high = mid - 1
            matched[name] = low
        return matched

    def record(self, endpoint: str, keys: Sequence[int]) -> None:
        """Remember that ``endpoint`` was sent the prefix ``keys``."""
        if not keys:
            return
        with self._lock:
            lru = self._lru.get(endpoint)
            if lru is None:
                lru = self._lru[endpoint] = OrderedDict()
            holders_of = self._holders
            for key in reversed(keys):  # shallow blocks end up most recent: evicted last
                if key in lru:
                    lru.move_to_end(key)
                else:
                    lru[key] = None
                    holders = holders_of.get(key)
                    if holders is None:
                        holders_of[key] = {endpoint: None}
                    else:
                        holders[endpoint] = None
            while len(lru) > self.max_blocks_per_endpoint:
                old, _ = lru.popitem(last=False)
                self._drop_holder(old, endpoint)

    def forget(self, endpoint: str) -> None:
        """Drop everything recorded for ``endpoint`` (it left, or its engine restarted)."""
        with self._lock:
            lru = self._lru.pop(endpoint, None)
            for key in lru or ():
                self._drop_holder(key, endpoint)

    def blocks(self, endpoint: str | None = None) -> int:
        if endpoint is None:
            return sum(len(lru) for lru in self._lru.values())
        return len(self._lru.get(endpoint, ()))

    def _drop_holder(self, key: int, endpoint: str) -> None:
        holders = self._holders.get(key)
        if holders is not None:
            holders.pop(endpoint, None)
            if not holders:
                del self._holders[key]


class ApproxPrefixScorer:
    TYPE: ClassVar[str] = "prefix-approx"

    def __init__(self, index: ApproxPrefixIndex, block_chars: int, block_tokens: int) -> None:
        self.name = self.TYPE
        self.index = index
        self.block_chars = block_chars
        self.block_tokens = block_tokens

    def keys_for(self, state: CycleState, request: LLMRequest) -> list[int]:
        keys = state.read(STATE_BLOCKS, list)
        if keys is None:
            if request.token_ids is not None:
                keys = token_block_keys(request.token_ids, self.block_tokens)
            else:
                keys = text_block_keys(request.prompt_text, self.block_chars)
            state.write(STATE_BLOCKS, keys)
        return keys

    def score(self, state: CycleState, request: LLMRequest,
              endpoints: Sequence[Endpoint]) -> list[float]:
        keys = self.keys_for(state, request)
        if not keys:
            return [0.0] * len(endpoints)
        matched = self.index.match(keys, [ep.name for ep in endpoints])
        state.write(STATE_MATCH, matched)
        total = len(keys)
        return [matched.get(ep.name, 0) / total for ep in endpoints]

    def on_dispatch(self, state: CycleState, request: LLMRequest, endpoint: Endpoint) -> None:
        self.index.record(endpoint.name, self.keys_for(state, request))

    @classmethod
    def build(cls, context: PluginContext) -> ApproxPrefixScorer:
        index = context.services.get_or_create(
            services_key(context.pool_key), ApproxPrefixIndex, ApproxPrefixIndex)
        engine_block = context.pool.spec.engine.block_size if context.pool else 16
        # Whole engine blocks, at least MIN_TOKEN_BLOCK tokens: approximate matching needs no
        # finer grain, and 4k-token prompts then cost 64 hashes, not 256.
        block_tokens = engine_block * max(1, -(-MIN_TOKEN_BLOCK // engine_block))
        return cls(index, context.scoring.prefix_block_chars, block_tokens)


def services_key(pool_key: str) -> str:
    """Where a pool's :class:`ApproxPrefixIndex` lives in the shared services."""
    return f"prefix-approx/{pool_key}"


def history_entries(services: SharedServices, pool_key: str) -> int:
    """(endpoint, block) entries of a pool's approximate history (bounded per endpoint by
    ``max_blocks_per_endpoint``); 0 when the pool has none."""
    index = services.get(services_key(pool_key), ApproxPrefixIndex)
    return index.entries() if index is not None else 0


def forget_endpoint(services: SharedServices, pool_key: str, endpoint: str) -> None:
    """An endpoint left its pool: drop its history (registered as an endpoint-removed
    listener, so a pod that comes back under the same name starts empty)."""
    index = services.get(services_key(pool_key), ApproxPrefixIndex)
    if index is not None:
        index.forget(endpoint)
