"""The prefix index: which endpoint holds which KV block, and how long a prompt's cached prefix is.

Two structures, kept consistent:

* per endpoint, an insertion-ordered ``dict`` block hash → reference count (vLLM may cache two
  physical blocks with the same hash; each ``BlockStored`` adds one reference, each
  ``BlockRemoved`` takes one away). Re-storing a block moves it to the end, so the order is
  "least recently stored first" and the per-endpoint bound evicts from the front — the same
  LRU direction as the engine;
* a global ``dict`` block hash → bitmask of endpoint *slots* (one bit per endpoint). A bitmask
  is a small int — values under 257 are shared CPython objects — so the map costs one dict slot
  plus the key per block, not a set per block.

``match()`` walks the prompt's block hashes in order, AND-ing the masks: the endpoints still set
after block *i* hold the consecutive prefix 0..i. It stops at the first block no endpoint holds,
so it is O(prompt blocks) and usually much less. Bytes per entry are measured in
``tests/unit/kvevents/test_index.py`` and stated in ``docs/kv-events.md``.

*Pending* blocks: vLLM publishes a block only once it is computed, so a prompt still in prefill
is invisible to the index. :meth:`PrefixIndex.mark_pending` (called when the router dispatches a
request) records the request's blocks as pending on that endpoint for ``pending_ttl`` seconds;
``match()`` counts a block as held when it is published *or* pending. A ``BlockStored`` or
``BlockRemoved`` for the block, a clear (restart, AllBlocksCleared) or expiry drops the mark.
Pending marks are kept like the published ones — per endpoint an insertion-ordered
``dict[hash, expiry]`` (oldest first, bounded by ``max_pending_per_endpoint``), globally a
``dict[hash, bitmask]`` — and expired marks are purged from the front before a match once one
may have expired (the index keeps a lower bound on the next expiry, so a match does not visit
every endpoint to find none), so the cost stays amortised O(1) per mark and the match
O(prompt blocks).

*Eviction forecast*: vLLM evicts cached blocks when the step that needs their room is
scheduled, but publishes the ``BlockRemoved`` events when that step ends, so for a step (and
the request's wait in the queue before it) the index still shows a context the engine is
about to drop — and draws traffic to it that will compute the context again there. With a
capacity (the engine's ``num_gpu_blocks``), :meth:`PrefixIndex.mark_pending` forecasts the
evictions a dispatch causes: the request's held blocks are touched (moved to the recent end,
as the engine keeps blocks in use), and once the endpoint's published plus pending blocks
exceed its capacity the excess is taken from the least recently stored or touched end and
*doomed* — hidden from ``match()`` until the engine's ``BlockRemoved`` confirms it, or for at
most ``pending_ttl`` seconds (the horizon of the pending marks, whose blocks make the room
needed), after which a block the engine did not drop counts again, at the least recent end
where the engine keeps it (a wrong forecast hides a block for that long, never for good). A
``BlockStored`` for a doomed block restores it at once. The simulator measured it before it
became the default (docs/benchmarks/emulated-fleet.md, round 29).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from functools import reduce
from itertools import repeat
from operator import itemgetter, or_
from typing import TypeVar

_V = TypeVar("_V")
DEFAULT_MAX_BLOCKS_PER_ENDPOINT = 1 << 20
DEFAULT_PENDING_TTL_S = 5.0
"""How long a dispatched request's blocks count as held before the engine's events confirm
them: longer than a typical prefill (so a burst of same-prefix requests sticks together), short
enough that a request that fails or is preempted before caching does not attract traffic for
long."""
DEFAULT_MAX_PENDING_PER_ENDPOINT = 1 << 16
DOOMED, CONFIRMED, RESTORED = 0, 1, 2
"""Indices of an endpoint's forecast counts."""
DISPATCH_STATES = ("held", "computing", "held_elsewhere", "evicted", "new")
"""Where a dispatched prompt's blocks stood (:meth:`PrefixIndex.dispatch_counts`): published
by the endpoint it went to; already being computed there (pending); published or being
computed by another endpoint only (a spill: the fleet computes it twice); held by no endpoint
but removed from one recently (the fleet's KV evicted it); neither (new to the fleet, or
evicted too long ago to be remembered)."""
HELD, COMPUTING, HELD_ELSEWHERE, EVICTED, NEW = range(5)
DEFAULT_MAX_EVICTED = 1 << 17
"""How many evicted block hashes the index remembers (fleet-wide, the most recent removals):
~10 MB; a block evicted longer ago than that reads as ``new``."""
FORECAST_EXPIRY_PASSES = 10
"""At most this many passes restore unconfirmed forecasts per ``pending_ttl`` (each one that
restores rebuilds an endpoint's block order: O(its blocks))."""


class PrefixIndex:
    """Block hash → endpoints, with per-endpoint reference counts and a size bound."""

    def __init__(self, max_blocks_per_endpoint: int = DEFAULT_MAX_BLOCKS_PER_ENDPOINT, *,
                 pending_ttl: float = DEFAULT_PENDING_TTL_S,
                 max_pending_per_endpoint: int = DEFAULT_MAX_PENDING_PER_ENDPOINT,
                 forecast_evictions: bool = False,
                 max_evicted: int = DEFAULT_MAX_EVICTED,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_blocks_per_endpoint < 1:
            raise ValueError(f"max_blocks_per_endpoint must be >= 1, got "
                             f"{max_blocks_per_endpoint}")
        if max_pending_per_endpoint < 0:
            raise ValueError(f"max_pending_per_endpoint must be >= 0, got "
                             f"{max_pending_per_endpoint}")
        self.max_blocks_per_endpoint = max_blocks_per_endpoint
        self.pending_ttl = pending_ttl
        self.max_pending_per_endpoint = max_pending_per_endpoint
        self.forecast_evictions = forecast_evictions
        self.clock = clock
        self._doomed: dict[str, dict[int, tuple[int, float]]] = {}
        """Per endpoint, blocks forecast to be evicted: hash → (reference count, expiry),
        oldest expiry first; hidden from the holders map until confirmed or expired."""
        self._next_doom_expiry = float("inf")
        self._forecasts: dict[str, list[int]] = {}
        """Per endpoint, blocks forecast to be evicted (doomed), evictions the engine
        confirmed, and forecasts it did not confirm in time or contradicted with a
        ``BlockStored`` (restored): :meth:`forecast_counts`."""
        self._pending: dict[str, dict[int, float]] = {}
        self._pending_holders: dict[int, int] = {}
        self._next_expiry = float("inf")
        """No pending mark expires before this (a lower bound: removing a mark leaves it as
        is), so :meth:`expire_pending` looks at the endpoints only once one may have."""
        self._slot_of: dict[str, int] = {}
        self._bit_of: dict[str, int] = {}  # 1 << slot
        self._endpoint_of_slot: dict[int, str] = {}
        self._blocks: dict[str, dict[int, int]] = {}
        self._holders: dict[int, int] = {}
        self.evicted_for_bound = 0
        self.max_evicted = max_evicted
        self._evicted: dict[int, None] = {}
        """Hashes of blocks recently removed from an endpoint (its last reference), oldest
        removal first, at most ``max_evicted``."""
        self._dispatched: dict[str, list[int]] = {}
        """Per endpoint, dispatched prompt blocks by where they stood (``DISPATCH_STATES``)."""

    # -- endpoints -------------------------------------------------------------------------
    def add_endpoint(self, endpoint: str) -> None:
        """Register an endpoint (idempotent); it holds no blocks until events arrive."""
        if endpoint in self._slot_of:
            return
        slot = next(s for s in range(len(self._slot_of) + 1) if s not in self._endpoint_of_slot)
        self._slot_of[endpoint] = slot
        self._bit_of[endpoint] = 1 << slot
        self._endpoint_of_slot[slot] = endpoint
        self._blocks[endpoint] = {}
        self._pending[endpoint] = {}
        self._doomed[endpoint] = {}
        self._forecasts[endpoint] = [0, 0, 0]
        self._dispatched[endpoint] = [0] * len(DISPATCH_STATES)

    def remove_endpoint(self, endpoint: str) -> None:
        """Forget an endpoint and all its blocks; its slot is reused."""
        if endpoint not in self._slot_of:
            return
        self.clear(endpoint)
        slot = self._slot_of.pop(endpoint)
        del self._bit_of[endpoint]
        del self._endpoint_of_slot[slot]
        del self._blocks[endpoint]
        del self._pending[endpoint]
        del self._doomed[endpoint]
        del self._forecasts[endpoint]
        del self._dispatched[endpoint]

    def endpoints(self) -> list[str]:
        return list(self._slot_of)

    # -- updates ---------------------------------------------------------------------------
    def store(self, endpoint: str, hashes: Iterable[int]) -> int:
        """Add one reference per hash; returns how many hashes were new to this endpoint."""
        self.add_endpoint(endpoint)
        blocks = self._blocks[endpoint]
        pending = self._pending[endpoint]
        doomed = self._doomed[endpoint]
        holders = self._holders
        pending_holders = self._pending_holders
        bit = 1 << self._slot_of[endpoint]
        others = ~bit
        new = 0
        for block_hash in hashes:  # per block: the router's hottest loop under KV events
            if pending and pending.pop(block_hash, None) is not None:
                # the pending mark is confirmed: _drop_pending_holder, inlined
                mask = pending_holders.get(block_hash, 0) & others
                if mask:
                    pending_holders[block_hash] = mask
                else:
                    pending_holders.pop(block_hash, None)
            count = blocks.pop(block_hash, 0)
            if not count and doomed:
                entry = doomed.pop(block_hash, None)
                if entry is not None:  # the engine kept it: the forecast was wrong
                    count = entry[0]
                    holders[block_hash] = holders.get(block_hash, 0) | bit
                    self._forecasts[endpoint][RESTORED] += 1
            blocks[block_hash] = count + 1
            if not count:
                new += 1
                holders[block_hash] = holders.get(block_hash, 0) | bit
        overflow = len(blocks) - self.max_blocks_per_endpoint
        if overflow > 0:
            oldest = list(_first(blocks, overflow))
            for block_hash in oldest:
                del blocks[block_hash]
                self._drop_holder(block_hash, bit)
            self.evicted_for_bound += len(oldest)
        return new

    def remove(self, endpoint: str, hashes: Iterable[int]) -> int:
        """Take one reference per hash; returns how many hashes this endpoint no longer holds.

        Removing a hash the endpoint does not hold is ignored (vLLM publishes duplicates, and a
        replay may repeat what was already applied).
        """
        blocks = self._blocks.get(endpoint)
        if blocks is None:
            return 0
        pending = self._pending[endpoint]
        doomed = self._doomed[endpoint]
        holders = self._holders
        pending_holders = self._pending_holders
        evicted = self._evicted
        bit = 1 << self._slot_of[endpoint]
        others = ~bit
        gone = 0
        for block_hash in hashes:  # per block; the holder updates inlined (a call per block)
            if pending and pending.pop(block_hash, None) is not None:
                mask = pending_holders.get(block_hash, 0) & others
                if mask:
                    pending_holders[block_hash] = mask
                else:
                    pending_holders.pop(block_hash, None)
            count = blocks.get(block_hash)
            if count is None:
                if doomed and block_hash in doomed:
                    gone += self._confirm_doomed(endpoint, doomed, block_hash)
                continue
            if count > 1:
                blocks[block_hash] = count - 1
                continue
            del blocks[block_hash]
            mask = holders.get(block_hash, 0) & others
            if mask:
                holders[block_hash] = mask
            else:
                holders.pop(block_hash, None)
            evicted.pop(block_hash, None)
            evicted[block_hash] = None
            gone += 1
        self._forget_evicted()
        return gone

    def _forget_evicted(self) -> None:
        overflow = len(self._evicted) - self.max_evicted
        if overflow > 0:
            evicted = self._evicted
            for block_hash in list(_first(evicted, overflow)):
                del evicted[block_hash]

    def clear(self, endpoint: str) -> int:
        """Drop every block of one endpoint (restart, AllBlocksCleared), pending marks too;
        returns how many published blocks were dropped."""
        self.clear_pending(endpoint)
        doomed = self._doomed.get(endpoint)
        if doomed:
            doomed.clear()
        blocks = self._blocks.get(endpoint)
        if not blocks:
            return 0
        bit = 1 << self._slot_of[endpoint]
        for block_hash in blocks:
            self._drop_holder(block_hash, bit)
        dropped = len(blocks)
        blocks.clear()
        return dropped

    # -- pending (dispatched, not yet published) ------------------------------------------
    def mark_pending(self, endpoint: str, hashes: Sequence[int],
                     capacity: int | None = None, *, own: bool = True) -> int:
        """Count these blocks as held by ``endpoint`` until published, removed, cleared or
        ``pending_ttl`` seconds from now; returns how many were marked (blocks already
        published there are skipped). With ``capacity`` (the endpoint's KV blocks) and
        ``forecast_evictions``, the published ones are touched and the evictions the
        dispatch causes are forecast (the module docstring). ``own``: this router's dispatch,
        counted in :meth:`dispatch_counts`; False for another replica's, which replica sync
        passes on (that replica counts it, so a sum over replicas counts each dispatch once)."""
        if self.max_pending_per_endpoint == 0 or self.pending_ttl <= 0:
            return 0
        self.add_endpoint(endpoint)
        blocks = self._blocks[endpoint]
        pending = self._pending[endpoint]
        pending_holders = self._pending_holders
        bit = 1 << self._slot_of[endpoint]
        now = self.clock()
        expiry = now + self.pending_ttl
        if expiry < self._next_expiry:
            self._next_expiry = expiry
        forecast = self.forecast_evictions and capacity is not None and capacity > 0
        marked = 0
        touched = 0
        if forecast:
            # In use from now: the engine evicts these last, and frees a request's blocks
            # tail first, so the prefix's head is the most recent.
            for block_hash in reversed(hashes):
                if block_hash in blocks:
                    blocks[block_hash] = blocks.pop(block_hash)
                    touched += 1
        holders = self._holders
        evicted = self._evicted
        computing = elsewhere = recomputed = 0
        for block_hash in hashes:
            if block_hash in blocks:
                continue
            if pending.pop(block_hash, None) is None:
                others = pending_holders.get(block_hash, 0)
                pending_holders[block_hash] = others | bit
                # this endpoint's own bit is clear in both maps (not published, not pending)
                if others or block_hash in holders:
                    elsewhere += 1
                elif block_hash in evicted:
                    recomputed += 1
            else:
                computing += 1
            pending[block_hash] = expiry  # (re-)inserted at the end: the dict stays by expiry
            marked += 1
        if own:
            counts = self._dispatched[endpoint]
            counts[HELD] += len(hashes) - marked
            counts[COMPUTING] += computing
            counts[HELD_ELSEWHERE] += elsewhere
            counts[EVICTED] += recomputed
            counts[NEW] += marked - computing - elsewhere - recomputed
        overflow = len(pending) - self.max_pending_per_endpoint
        if overflow > 0:
            for block_hash in list(_first(pending, overflow)):
                del pending[block_hash]
                self._drop_pending_holder(block_hash, bit)
        if forecast and capacity is not None:
            excess = min(len(blocks) + len(pending) - capacity, len(blocks) - touched)
            if excess > 0:
                self._doom(endpoint, excess, expiry)
        return marked

    def _doom(self, endpoint: str, count: int, expiry: float) -> None:
        """Hide the ``count`` least recently stored or touched blocks of ``endpoint`` until the
        engine confirms their eviction or ``expiry``."""
        blocks = self._blocks[endpoint]
        doomed = self._doomed[endpoint]
        bit = 1 << self._slot_of[endpoint]
        for block_hash in list(_first(blocks, count)):
            doomed[block_hash] = (blocks.pop(block_hash), expiry)
            self._drop_holder(block_hash, bit)
        self._forecasts[endpoint][DOOMED] += count
        if expiry < self._next_doom_expiry:
            self._next_doom_expiry = expiry

    def _confirm_doomed(self, endpoint: str, doomed: dict[int, tuple[int, float]],
                        block_hash: int) -> int:
        """A ``BlockRemoved`` for a doomed block: one reference fewer; 1 when it was the last."""
        count, expiry = doomed[block_hash]
        if count > 1:
            doomed[block_hash] = (count - 1, expiry)
            return 0
        del doomed[block_hash]
        self._forecasts[endpoint][CONFIRMED] += 1
        self._evicted.pop(block_hash, None)
        self._evicted[block_hash] = None  # remove() forgets the overflow after its loop
        return 1

    def expire_doomed(self) -> int:
        """Count again the doomed blocks the engine has not confirmed evicting in time (the
        forecast was wrong); returns how many. ``match()`` calls it."""
        now = self.clock()
        if now < self._next_doom_expiry:
            return 0
        restored = 0
        next_expiry = float("inf")
        for endpoint, doomed in self._doomed.items():
            if not doomed:
                continue
            gone, left = _pop_expired(doomed, now, _DOOM_EXPIRY)
            next_expiry = min(next_expiry, left)
            if gone:  # still the least recent: back at the front, where the engine has them
                blocks = self._blocks[endpoint]
                bit = 1 << self._slot_of[endpoint]
                back = {block_hash: count for block_hash, (count, _) in gone}
                for block_hash in back:
                    self._holders[block_hash] = self._holders.get(block_hash, 0) | bit
                restored += len(back)
                self._forecasts[endpoint][RESTORED] += len(back)
                back.update(blocks)  # O(endpoint's blocks): hence the batching below
                blocks.clear()
                blocks.update(back)
        # Restores are batched, at most FORECAST_EXPIRY_PASSES per pendingMs: each pass that
        # restores rebuilds the endpoint's order, and a block a little late back costs little.
        self._next_doom_expiry = max(next_expiry,
                                     now + self.pending_ttl / FORECAST_EXPIRY_PASSES)
        return restored

    def forecast_counts(self) -> dict[str, tuple[int, int, int]]:
        """Per endpoint: blocks forecast to be evicted, evictions confirmed, forecasts
        restored unconfirmed (cumulative)."""
        return {endpoint: (c[DOOMED], c[CONFIRMED], c[RESTORED])
                for endpoint, c in self._forecasts.items()}

    def dispatch_counts(self) -> dict[str, tuple[int, ...]]:
        """Per endpoint: the blocks of the prompts dispatched there (:meth:`mark_pending`), by
        where each stood at dispatch (``DISPATCH_STATES``; cumulative)."""
        return {endpoint: tuple(c) for endpoint, c in self._dispatched.items()}

    def clear_pending(self, endpoint: str) -> int:
        """Drop every pending mark of one endpoint; returns how many."""
        pending = self._pending.get(endpoint)
        if not pending:
            return 0
        bit = 1 << self._slot_of[endpoint]
        for block_hash in pending:
            self._drop_pending_holder(block_hash, bit)
        dropped = len(pending)
        pending.clear()
        return dropped

    def expire_pending(self) -> int:
        """Drop pending marks whose time is up; returns how many. ``match()`` calls it."""
        if not self._pending_holders:
            return 0
        now = self.clock()
        if now < self._next_expiry:
            return 0
        expired = 0
        next_expiry = float("inf")
        for endpoint, pending in self._pending.items():
            if not pending:
                continue
            bit = 1 << self._slot_of[endpoint]
            gone, left = _pop_expired(pending, now, float)
            next_expiry = min(next_expiry, left)  # the endpoint's oldest mark left
            for block_hash, _ in gone:
                self._drop_pending_holder(block_hash, bit)
            expired += len(gone)
        self._next_expiry = next_expiry
        return expired

    def pending_count(self, endpoint: str) -> int:
        """Pending marks of one endpoint (expired ones included until the next purge)."""
        return len(self._pending.get(endpoint, {}))

    def is_pending(self, endpoint: str, block_hash: int) -> bool:
        expiry = self._pending.get(endpoint, {}).get(block_hash)
        return expiry is not None and expiry > self.clock()

    def _drop_pending_holder(self, block_hash: int, bit: int) -> None:
        mask = self._pending_holders.get(block_hash, 0) & ~bit
        if mask:
            self._pending_holders[block_hash] = mask
        else:
            self._pending_holders.pop(block_hash, None)

    def _drop_holder(self, block_hash: int, bit: int) -> None:
        mask = self._holders.get(block_hash, 0) & ~bit
        if mask:
            self._holders[block_hash] = mask
        else:
            self._holders.pop(block_hash, None)

    # -- queries ---------------------------------------------------------------------------
    def match(self, prompt_hashes: Sequence[int],
              endpoints: Iterable[str] | None = None) -> dict[str, int]:
        """Longest consecutive cached prefix, in blocks, per endpoint (0 when none).

        A block counts when it is published or pending (unexpired) on the endpoint.
        ``endpoints`` restricts the answer (unknown names get 0); default: every endpoint.
        """
        self.expire_pending()
        if self._next_doom_expiry != float("inf"):
            self.expire_doomed()
        pending = self._pending_holders
        wanted = list(self._slot_of) if endpoints is None else list(endpoints)
        result = dict.fromkeys(wanted, 0)
        alive = reduce(or_, map(self._bit_of.get, wanted, repeat(0)), 0)
        if not alive:
            return result
        # The holders of each block are looked up in C (map); Python ANDs and compares, and
        # reads the pending marks only where the published holders fall short.
        pending_get = pending.get if pending else None
        masks = map(self._holders.get, prompt_hashes, repeat(0))
        for depth, (block_hash, held) in enumerate(zip(prompt_hashes, masks, strict=True)):
            still = alive & held
            if still != alive:
                if pending_get is not None:
                    still = alive & (held | pending_get(block_hash, 0))
                    if still == alive:
                        continue
                if depth:  # some endpoints' prefixes end before block ``depth`` (0: as set)
                    self._record(result, alive & ~still, depth)
                alive = still
                if not alive:
                    break
        if alive:  # these hold the whole prompt
            self._record(result, alive, len(prompt_hashes))
        return result

    def _record(self, result: dict[str, int], mask: int, depth: int) -> None:
        while mask:
            low = mask & -mask
            result[self._endpoint_of_slot[low.bit_length() - 1]] = depth
            mask ^= low

    def holds(self, endpoint: str, block_hash: int) -> bool:
        return block_hash in self._blocks.get(endpoint, {})

    def block_count(self, endpoint: str) -> int:
        """Distinct blocks one endpoint holds."""
        return len(self._blocks.get(endpoint, {}))

    def distinct_blocks(self) -> int:
        """Distinct block hashes held by any endpoint."""
        return len(self._holders)

    def entries(self) -> int:
        """(endpoint, block) pairs: the size the memory bound is about."""
        return sum(len(b) for b in self._blocks.values())


_DOOM_EXPIRY = itemgetter(1)
"""A doomed block's expiry, from its (reference count, expiry)."""


def _pop_expired(entries: dict[int, _V], now: float,
                 expiry_of: Callable[[_V], float]) -> tuple[list[tuple[int, _V]], float]:
    """Take the entries whose expiry is not after ``now`` from the front of ``entries`` (kept
    in expiry order: pending marks, doomed blocks); returns them and the first expiry left
    (inf when none is)."""
    gone: list[tuple[int, _V]] = []
    left = float("inf")
    for key, value in entries.items():
        expiry = expiry_of(value)
        if expiry > now:
            left = expiry
            break
        gone.append((key, value))
    for key, _ in gone:
        del entries[key]
    return gone, left


def _first(blocks: Iterable[int], count: int) -> Iterable[int]:
    for number, block_hash in enumerate(blocks):
        if number >= count:
            return
        yield block_hash
