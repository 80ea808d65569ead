"""One simulated vLLM engine: continuous batching, chunked prefill, a prefix cache with LRU
eviction inside a fixed KV capacity, and the metrics and KV events a real engine publishes.

The model follows vLLM v1's scheduler in the parts that decide routing outcomes:

* A step has a token budget (``max_batched_tokens``). Running sequences that are decoding take
  one token each first; then sequences still prefilling take chunks of their remaining prompt;
  then waiting sequences are admitted in arrival order while ``max_num_seqs`` and the KV
  capacity allow (chunked prefill: a long prompt spreads over several steps). Under the
  ``priority`` scheduling policy (vLLM's ``--scheduling-policy priority``) they are admitted
  in (``priority``, arrival) order instead, lower values first. A waiting request never
  preempts a running one (in vLLM either: only a running sequence short of blocks does).
* On admission the prompt's full blocks are looked up in the prefix cache; the longest cached
  run of leading blocks is reused (at least one prompt token is always computed, as in vLLM).
  Queried and hit tokens feed ``prefix_cache_queries`` / ``prefix_cache_hits``.
* KV blocks, by ``kv_allocation``: ``reserve`` reserves them for the whole prompt and
  output at admission, so a sequence waits for room instead of being preempted (a
  simplification; the rounds before 59). ``on-demand`` (the default) allocates as vLLM
  does: a step takes the blocks its tokens fill, a waiting request is admitted when its
  first chunk fits, and a running sequence that finds no free block preempts one — the
  newest admitted under fcfs, the lowest priority (largest (priority, arrival)) under
  priority, itself when it is that one. The preempted sequence frees its blocks (its full
  ones stay cached, evictable), goes back to the head of the queue (in priority order under
  priority), and is prefilled again from its prompt and the tokens it had generated,
  hitting whatever of that is still cached; no new request is admitted in a step that
  preempted. Its first token keeps its first time. A block
  becomes cached when the step that fills it is **scheduled**, as vLLM's ``allocate_slots``
  caches it, not when the step ends: a request admitted later in the same step (or while an
  earlier one's long prefill is still in chunks) hits it instead of computing it again —
  checked against a real vLLM-CPU engine, where identical prompts sent together are computed
  once. ``BlockStored`` is published when the step ends, as vLLM publishes it. Prompt blocks
  are cached as the prefill reaches them and, as in vLLM, blocks of generated tokens as
  decoding fills them (the newest token's KV is computed by the next step, so a finished
  request leaves ``(prompt + output - 1) // block_size`` full blocks). Their hashes are the
  request's ``output_hashes`` when given (the emulator: vLLM's hashes of the tokens it
  streams), else ids no prompt can have (the simulator: its outputs are never sent back).
* When a sequence finishes (or is aborted) its cached blocks stay resident but evictable,
  least recently used first (``BlockRemoved`` when evicted). They are released **last block
  first**, as vLLM's ``free`` does, so of one request's blocks its generated tail and its own
  question go before the shared context it started with, and a context evicted in part keeps
  its leading blocks — still a hit for the next request that shares them. (Released first
  block first, a partly evicted context lost block 0 and with it every hit, while its other
  blocks still held capacity: checked against a real vLLM-CPU engine by
  ``tests/e2e/test_emulator_fidelity.py``.)

Block hashes chain like vLLM's (each depends on its parent and its tokens). By default they
use BLAKE2b over the token bytes (:func:`block_hashes`) and identify blocks inside the
simulation only; with the KV-event picker (``kvroute-precise-load``) a request's ``hashes`` are
the router's own vLLM-compatible ones, set at its routing decision, so the engine's
``BlockStored`` / ``BlockRemoved`` events name blocks exactly as a real engine's would.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvroute_emulator.model.profile import CostProfile

SCHEDULING_POLICIES = ("fcfs", "priority")
"""vLLM's ``--scheduling-policy`` choices: arrival order, or (priority, arrival) order."""

KV_ALLOCATIONS = ("reserve", "on-demand")
"""How the model hands out KV blocks: the whole request's at admission (no preemption), or
a step's as it needs them, preempting on exhaustion (vLLM's way)."""

DEFAULT_KV_ALLOCATION = "on-demand"
"""vLLM's own; ``reserve`` reproduces the rounds published before round 59."""


def block_hashes(tokens: bytes, block_size: int) -> list[int]:
    """Chained 64-bit hashes of the full blocks of ``tokens``."""
    hashes: list[int] = []
    parent = b"kvroute-sim-root"
    for start in range(0, len(tokens) - block_size + 1, block_size):
        digest = hashlib.blake2b(parent + tokens[start:start + block_size],
                                 digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "big"))
        parent = digest
    return hashes


@dataclass
class SimRequest:
    """A request inside the simulator, and what happened to it."""

    id: int
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    hashes: list[int]
    prompt: str = ""  # kept only when a picker needs the text (the router's prefix scorers)
    priority: int = 0  # lower first under the priority policy (read at enqueue); fcfs ignores it
    engine: int = -1
    admitted_s: float | None = None
    first_token_s: float | None = None
    done_s: float | None = None
    cached_tokens: int = 0
    computed: int = 0  # prompt tokens computed so far (cached ones count as computed)
    generated: int = 0
    blocks: list[int] = field(default_factory=list)  # hashes of cached blocks it pins
    allocated: int = 0  # blocks it holds while running: ``blocks`` + reserved ones not full
    prefill_len: int = -1
    """Tokens to compute before it decodes: the prompt's, or after a preemption the prompt's
    and the generated ones (set from ``prompt_tokens`` when negative)."""
    preemptions: int = 0
    output_hashes: list[int] | None = None
    """Hashes of the full blocks after the prompt's (the block where the prompt ends and the
    output begins, then output only), in chain order; ``None``: ids no prompt can have."""

    def __post_init__(self) -> None:
        if self.prefill_len < 0:
            self.prefill_len = self.prompt_tokens

    def sequence_hashes(self, block_size: int) -> list[int]:
        """The full blocks it computes before decoding: the prompt's, and after a preemption
        those of the generated tokens it computes again."""
        if self.prefill_len <= self.prompt_tokens:
            return self.hashes
        extra = max(0, self.prefill_len // block_size - len(self.hashes))
        return self.hashes + [self.output_hash(i) for i in range(extra)]

    def output_hash(self, index: int) -> int:
        """The hash of the ``index``-th full block after the prompt's full blocks."""
        if self.output_hashes is not None and index < len(self.output_hashes):
            return self.output_hashes[index]
        digest = hashlib.blake2b(b"kvroute-sim-output" + self.id.to_bytes(8, "big", signed=True)
                                 + index.to_bytes(4, "big"), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.done_s is None else self.done_s - self.arrival_s


def _priority_order(request: SimRequest) -> tuple[int, float, int]:
    return (request.priority, request.arrival_s, request.id)


@dataclass
class StepPlan:
    """What one step computes: prefill chunks per request, and the decoding requests."""

    prefill: list[tuple[SimRequest, int]]
    decode: list[SimRequest]
    events: list[dict[str, Any]] = field(default_factory=list)
    """The KV events of scheduling it, published when it ends (as vLLM publishes a step's)."""

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefill)


class SimEngine:
    """One engine; the fleet loop calls :meth:`enqueue`, :meth:`plan_step`, :meth:`finish_step`."""

    def __init__(self, index: int, profile: CostProfile, *,
                 scheduling_policy: str = "fcfs",
                 kv_allocation: str = DEFAULT_KV_ALLOCATION) -> None:
        if scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"unknown scheduling policy {scheduling_policy!r}: use "
                             f"{' or '.join(SCHEDULING_POLICIES)}")
        if kv_allocation not in KV_ALLOCATIONS:
            raise ValueError(f"unknown KV allocation {kv_allocation!r}: use "
                             f"{' or '.join(KV_ALLOCATIONS)}")
        self.index = index
        self.profile = profile
        self.scheduling_policy = scheduling_policy
        self.on_demand = kv_allocation == "on-demand"
        # In admission order: arrival order under fcfs; under priority kept sorted on
        # enqueue, so admission and abort read it the same way under both policies.
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.refcount: dict[int, int] = {}  # cached block hash -> sequences pinning it
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unpinned cached, LRU first
        self.reserved = 0  # blocks reserved by running sequences beyond their pinned hits
        self.pinned = 0  # cached blocks with refcount > 0 (kept up to date, not recounted)
        self.events: list[dict[str, Any]] = []  # KV events since the last drain
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.finished = 0
        self.preemptions = 0
        self._stored: list[int] = []  # blocks the step being planned stores (not yet published)
        self._released_stored: set[int] = set()  # of those, ones a preemption released
        self.busy_until: float | None = None
        self.version = 0  # bumped on every change a metrics reader could see

    # --- capacity ------------------------------------------------------------------------

    def _used_blocks(self) -> int:
        """Blocks held by running sequences (pinned cached blocks + reservations)."""
        return self.pinned + self.reserved

    def _free_blocks(self) -> int:
        resident = len(self.refcount)  # pinned + evictable cached blocks
        return self.profile.kv_blocks - resident - self.reserved

    def _evict(self, need: int) -> bool:
        """Evict LRU unpinned cached blocks until ``need`` blocks are free."""
        removed: list[int] = []
        while self._free_blocks() < need and self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.refcount[block]
            if block in self._released_stored:
                # stored by this step for a sequence it then preempted: never published
                self._stored.remove(block)
                self._released_stored.discard(block)
            else:
                removed.append(block)
        if removed:
            self.events.append({"type": "BlockRemoved", "block_hashes": removed})
        return self._free_blocks() >= need

    # --- requests ------------------------------------------------------------------------

    def enqueue(self, request: SimRequest) -> None:
        request.engine = self.index
        self._queue(request)
        self.version += 1

    def _queue(self, request: SimRequest, *, front: bool = False) -> None:
        if self.scheduling_policy == "priority":
            # vLLM's PriorityRequestQueue order: priority, then arrival time, then request
            # id. A binary-search insert keeps the queue sorted without re-sorting per step.
            bisect.insort(self.waiting, request, key=_priority_order)
        elif front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def held_blocks(self, hashes: Sequence[int]) -> int:
        """How many of ``hashes``' leading blocks this engine's cache holds."""
        held = 0
        for block in hashes:
            if block not in self.refcount:
                break
            held += 1
        return held

    def _admit(self, request: SimRequest, now: float, budget: int) -> bool:
        """Admit ``request`` if its blocks fit: all of them (reserve), or those of its first
        chunk of at most ``budget`` tokens (on demand)."""
        bs = self.profile.block_size
        sequence = request.sequence_hashes(bs)
        hit_blocks = self.held_blocks(sequence)
        # vLLM always computes at least the last prompt token.
        if hit_blocks * bs >= request.prefill_len:
            hit_blocks = max(0, (request.prefill_len - 1) // bs)
        if self.on_demand:
            first_chunk = min(budget, request.prefill_len - hit_blocks * bs)
            total_blocks = -(-(hit_blocks * bs + first_chunk) // bs)
        else:
            total_blocks = -(-(request.prompt_tokens + request.max_tokens) // bs)
        new_blocks = total_blocks - hit_blocks
        hits = sequence[:hit_blocks]
        # Room without touching anything, as vLLM checks before it allocates: the free blocks
        # plus the evictable ones that are not among the hits. (Pinning the hits and unpinning
        # them on failure moved them to the recent end of the LRU order.)
        evictable_hits = sum(1 for h in hits if self.refcount[h] == 0)
        if self._free_blocks() + len(self.evictable) - evictable_hits < new_blocks:
            return False
        # Pin the hits first so eviction cannot take them.
        for h in hits:
            if self.refcount[h] == 0:
                self.pinned += 1
                del self.evictable[h]
            self.refcount[h] += 1
        evicted = self._evict(new_blocks)
        assert evicted, "room was checked above"
        request.blocks = list(hits)
        request.allocated = total_blocks
        self.reserved += new_blocks
        request.computed = hit_blocks * bs
        if request.preemptions == 0:  # vLLM counts a resumed request's lookup apart
            request.cached_tokens = request.computed
            request.admitted_s = now
            self.prefix_queries += request.prompt_tokens
            self.prefix_hits += request.cached_tokens
        return True

    def _grow(self, request: SimRequest, tokens: int) -> bool:
        """Allocate the blocks ``request`` needs to hold ``tokens`` tokens (on demand); False,
        allocating nothing, when they are not free or evictable."""
        need = -(-tokens // self.profile.block_size) - request.allocated
        if need <= 0:
            return True
        if self._free_blocks() + len(self.evictable) < need:
            return False
        evicted = self._evict(need)
        assert evicted, "room was checked above"
        self.reserved += need
        request.allocated += need
        return True

    def _victim(self) -> SimRequest:
        """The running sequence vLLM preempts: the lowest priority (largest (priority,
        arrival)) under priority, the newest admitted under fcfs."""
        if self.scheduling_policy == "priority":
            return max(self.running, key=_priority_order)
        return self.running[-1]

    def _preempt(self, request: SimRequest) -> None:
        """Free ``request``'s blocks (its full ones stay cached) and queue it again at the
        head, to be prefilled from its prompt and the tokens it generated."""
        self.running.remove(request)
        self._released_stored |= set(self._stored).intersection(request.blocks)
        self.reserved -= request.allocated - len(request.blocks)
        self._release(request)
        request.blocks = []
        request.allocated = 0
        request.computed = 0
        request.prefill_len = request.prompt_tokens + request.generated
        request.preemptions += 1
        self.preemptions += 1
        self._queue(request, front=True)

    def _unpin(self, block: int) -> None:
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.pinned -= 1
            self.evictable[block] = None

    def plan_step(self, now: float) -> StepPlan | None:
        """Choose the next step's work (admitting waiting requests); None when idle.

        As vLLM's scheduler does, the blocks the step will fill are cached as it is scheduled
        (``KVCacheManager.allocate_slots``), running requests first: a request admitted
        later in the same step, or in a later one while a long prefill is still in chunks,
        hits the blocks already scheduled instead of computing them a second time. Their
        ``BlockStored`` events wait for the step's end, when vLLM publishes them."""
        self.version += 1
        mark = len(self.events)
        stored: list[int] = []
        self._stored = stored
        budget = self.profile.max_batched_tokens
        if self.on_demand:
            prefill, decode, budget, preempted = self._plan_running_on_demand(budget)
        else:
            prefill, decode, budget = self._plan_running(budget)
            preempted = False
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.profile.max_num_seqs):
            if not self._admit(self.waiting[0], now, budget):
                break
            r = self.waiting.popleft()
            self.running.append(r)
            chunk = min(budget, r.prefill_len - r.computed)
            prefill.append((r, chunk))
            self._cache_chunk(r, chunk)
            budget -= chunk
        self._stored = []
        self._released_stored.clear()
        if stored:
            self.events.append({"type": "BlockStored", "block_hashes": stored,
                                "block_size": self.profile.block_size})
        if not prefill and not decode:
            return None  # nothing admitted, so nothing evicted or stored either
        events = self.events[mark:]
        del self.events[mark:]
        return StepPlan(prefill=prefill, decode=decode, events=events)

    def _plan_running(self, budget: int) -> tuple[list[tuple[SimRequest, int]],
                                                   list[SimRequest], int]:
        """The running sequences' share of a step when their blocks are reserved: every
        decode, then prefill chunks in admission order while the token budget lasts."""
        decode = [r for r in self.running if r.computed >= r.prefill_len]
        budget -= len(decode)
        for r in decode:
            self._cache_decode(r)
        prefill: list[tuple[SimRequest, int]] = []
        for r in self.running:
            if r.computed < r.prefill_len and budget > 0:
                chunk = min(budget, r.prefill_len - r.computed)
                prefill.append((r, chunk))
                self._cache_chunk(r, chunk)
                budget -= chunk
        return prefill, decode, budget

    def _plan_running_on_demand(self, budget: int) -> tuple[
            list[tuple[SimRequest, int]], list[SimRequest], int, bool]:
        """As :meth:`_plan_running`, allocating each sequence's blocks as the step needs them
        and preempting (:meth:`_victim`) when none are left; the last item: it preempted."""
        decode: list[SimRequest] = []
        prefill: list[tuple[SimRequest, int]] = []
        preempted = False
        order = ([r for r in self.running if r.computed >= r.prefill_len]
                 + [r for r in self.running if r.computed < r.prefill_len])
        for r in order:
            if r not in self.running:
                continue  # preempted earlier in this step
            decoding = r.computed >= r.prefill_len
            tokens = 1 if decoding else min(budget, r.prefill_len - r.computed)
            if tokens <= 0:
                continue
            while not self._grow(r, r.prompt_tokens + r.generated if decoding
                                 else r.computed + tokens):
                victim = self._victim()
                preempted = True
                if victim in decode:
                    decode.remove(victim)
                    budget += 1
                for i, (v, chunk) in enumerate(prefill):
                    if v is victim:
                        del prefill[i]
                        budget += chunk
                        break
                self._preempt(victim)
                if victim is r:
                    return prefill, decode, budget, preempted
            budget -= tokens
            if decoding:
                decode.append(r)
                self._cache_decode(r)
            else:
                prefill.append((r, tokens))
                self._cache_chunk(r, tokens)
        return prefill, decode, budget, preempted

    def _cache_decode(self, request: SimRequest) -> None:
        """The token sampled last step is fed in this one: cache the blocks it fills."""
        self._cache_output_blocks(
            request, (request.prompt_tokens + request.generated) // self.profile.block_size)

    def _cache_output_blocks(self, request: SimRequest, full: int) -> None:
        """Cache ``request``'s blocks after its prompt's until it holds ``full`` of them."""
        while len(request.blocks) < full:
            self._cache_block(request, request.output_hash(len(request.blocks)
                                                           - len(request.hashes)))

    def _cache_chunk(self, request: SimRequest, chunk: int) -> None:
        """Cache the full prompt blocks ``request``'s next ``chunk`` tokens complete."""
        bs = self.profile.block_size
        end = request.computed + chunk
        after = min(end // bs, len(request.hashes))
        for h in request.hashes[request.computed // bs:after]:
            self._cache_block(request, h)
        if end > request.prompt_tokens:  # after a preemption: the generated tokens again
            self._cache_output_blocks(request, end // bs)

    def step_duration(self, plan: StepPlan) -> float:
        return self.profile.step_s(plan.prefill_tokens, len(plan.decode))

    def finish_step(self, plan: StepPlan, now: float) -> list[SimRequest]:
        """Apply a step that ended at ``now``; returns the requests that finished."""
        self.version += 1
        self.events.extend(plan.events)
        for r, chunk in plan.prefill:
            r.computed += chunk
            if r.computed >= r.prefill_len:
                if r.first_token_s is None:
                    r.first_token_s = now
                r.generated += 1  # the first token, or after a preemption the next one
        for r in plan.decode:
            r.generated += 1
        done = [r for r in self.running
                if r.computed >= r.prefill_len and r.generated >= r.max_tokens]
        if done:
            self.running = [r for r in self.running
                            if r.computed < r.prefill_len or r.generated < r.max_tokens]
        for r in done:
            r.done_s = now
            self.reserved -= r.allocated - len(r.blocks)
            self._release(r)
            self.finished += 1
        return done

    def _cache_block(self, request: SimRequest, block: int) -> None:
        """``request``'s scheduled step fills ``block``: cache it (or share the copy a concurrent
        request filled), using one of its reserved blocks."""
        count = self.refcount.get(block)
        if count is not None:  # computed again by a concurrent request: share it
            if count == 0:
                self.pinned += 1
                del self.evictable[block]
            self.refcount[block] = count + 1
        else:
            self.refcount[block] = 1
            self.pinned += 1
            self._stored.append(block)
        self.reserved -= 1
        request.blocks.append(block)

    def _release(self, request: SimRequest) -> None:
        """Unpin ``request``'s cached blocks last block first (vLLM frees a request's blocks in
        reverse so that its tail is evicted first)."""
        for block in reversed(request.blocks):
            self._unpin(block)

    def abort(self, request: SimRequest) -> bool:
        """Drop ``request`` (its client went away), releasing what it holds; call between
        steps, never while a planned step is in flight. False when it is not here."""
        for i, r in enumerate(self.waiting):
            if r is request:
                del self.waiting[i]
                self.version += 1
                return True
        for i, r in enumerate(self.running):
            if r is request:
                del self.running[i]
                self.reserved -= r.allocated - len(r.blocks)
                self._release(r)
                r.blocks = []
                self.version += 1
                return True
        return False

    def clear_cache(self) -> bool:
        """Forget every cached block that no sequence pins (vLLM's reset_prefix_cache, which
        succeeds only when nothing runs). False, changing nothing, while sequences run."""
        if self.running:
            return False
        self.refcount.clear()
        self.evictable.clear()
        self.pinned = 0
        self.version += 1
        return True

    # --- what a real engine exposes --------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """The vLLM gauges and counters the router's scrapers read."""
        return {
            "vllm:num_requests_running": float(len(self.running)),
            "vllm:num_requests_waiting": float(len(self.waiting)),
            "vllm:kv_cache_usage_perc": self._used_blocks() / self.profile.kv_blocks,
            "vllm:prefix_cache_queries_total": float(self.prefix_queries),
            "vllm:prefix_cache_hits_total": float(self.prefix_hits),
            "vllm:request_success_total": float(self.finished),
        }

    def drain_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events
