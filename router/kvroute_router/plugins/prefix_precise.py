"""``prefix-precise``: scores endpoints by the prompt prefix their KV cache *really* holds.

The prompt is tokenised as the engine does and hashed into vLLM block hashes, and looked up in
the pool's KV-block index, which the engines' KV events keep current: all three are behind the
:class:`PoolPrefixCache` protocol, implemented by :class:`kvroute_router.kvevents.hub.PoolKVEvents`
(this plugin imports nothing from ``kvevents``, which sits above ``plugins`` in the layers).
An endpoint's score is the share of the prompt's full blocks
that form a prefix it holds.

Per endpoint, the scorer falls back to the approximate scorer (``prefix-approx``, the router's
own history) when that endpoint's index cannot be trusted: no subscriber, disconnected, not in
sequence yet, or its hashes do not reproduce (the self-check alarm). The whole request falls
back when the prompt cannot be tokenised in process (no tokenizer files, tools, LoRA adapters
whose path the router does not know). Dispatches are always recorded in the approximate history
so the fallback stays warm.

A dispatch to a trusted endpoint also marks the prompt's blocks *pending* there
(``PoolPrefixCache.mark_pending``): vLLM publishes a block only after computing it, so
without the mark a second request for the same prefix arriving during the first one's prefill
would not be drawn to that engine. The mark lasts until the engine's events publish or remove
the block, the endpoint's index is cleared, or a few seconds pass.

Registration: :func:`kvroute_router.kvevents.feed.register_precise_prefix`, which builds the
scorer over the pool's ``PoolKVEvents`` (found in the shared services under
``kvevents/<pool key>``, where the router's feed puts it); when the ``kvevents`` package is not
usable the type is not registered and ``register_builtin_plugins``'s fallback
(``prefix-precise`` → ``prefix-approx``) applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.request import LLMRequest
from kvroute_router.plugins.prefix_approx import ApproxPrefixScorer

STATE_HASHES = "prefix-precise/hashes"
STATE_MATCH = "prefix-precise/match"
STATE_UNHASHABLE = "prefix-precise/unhashable"
"""CycleState keys: the prompt's block hashes (list[int]), computed once per request and read
by every later step (re-scoring, the approximate fallback's bookkeeping, logging); the precise
match per endpoint name in blocks (dict[str, int]; endpoints scored approximately are absent);
and a marker (``True``) that the hashes cannot be computed in process, so a second scoring of
the same request does not try again."""


class PoolPrefixCache(Protocol):
    """What the scorer reads from one pool's KV-event index."""

    def prompt_block_hashes(self, request: LLMRequest) -> list[int] | None:
        """The prompt's block hashes as the engine computes them; None when the prompt cannot
        be tokenised in process."""
        ...

    def trustworthy(self, endpoint: str) -> bool:
        """Whether the index is right for this endpoint now."""
        ...

    def match(self, hashes: Sequence[int], endpoints: Sequence[str]) -> dict[str, int]:
        """Leading blocks of ``hashes`` each endpoint holds."""
        ...

    def mark_pending(self, endpoint: str, hashes: Sequence[int],
                     capacity: int | None = None) -> None:
        """The endpoint is about to compute these blocks; ``capacity``: its KV blocks, when
        known (the index forecasts the evictions the dispatch causes)."""
        ...

    def record_scoring(self, precise: int | None, approximate: int,
                       best_match: int | None) -> None:
        """Count endpoints scored each way (``precise`` None: the prompt could not be hashed)
        and the longest match (metrics)."""
        ...


class PrecisePrefixScorer:
    """Share of the prompt's blocks each endpoint holds, from KV events."""

    TYPE: ClassVar[str] = "prefix-precise"

    def __init__(self, pool_events: PoolPrefixCache, approximate: ApproxPrefixScorer) -> None:
        self.name = self.TYPE
        self.pool_events = pool_events
        self.approximate = approximate

    def block_hashes(self, state: CycleState, request: LLMRequest) -> list[int] | None:
        """The prompt's block hashes, or None when they cannot be computed in process."""
        cached = state.read(STATE_HASHES, list)
        if cached is not None:
            return cached
        if STATE_UNHASHABLE in state:
            return None
        hashes = self._compute_hashes(request)
        if hashes is None:
            state.write(STATE_UNHASHABLE, True)
        else:
            state.write(STATE_HASHES, hashes)
        return hashes

    def _compute_hashes(self, request: LLMRequest) -> list[int] | None:
        if request.lora_adapter is not None:
            return None
        return self.pool_events.prompt_block_hashes(request)

    def score(self, state: CycleState, request: LLMRequest,
              endpoints: Sequence[Endpoint]) -> list[float]:
        cache = self.pool_events
        hashes = self.block_hashes(state, request)
        precise = [ep for ep in endpoints if cache.trustworthy(ep.name)]
        if hashes is None or len(precise) < len(endpoints):
            fallback = self.approximate.score(state, request, endpoints)
        else:
            fallback = [0.0] * len(endpoints)
        if hashes is None:
            cache.record_scoring(None, len(endpoints), None)
            return list(fallback)
        if not hashes:
            return [0.0] * len(endpoints)
        matched = cache.match(hashes, [ep.name for ep in precise])
        state.write(STATE_MATCH, matched)
        cache.record_scoring(len(precise), len(endpoints) - len(precise),
                             max(matched.values()) if matched else None)
        total = len(hashes)
        return [matched[ep.name] / total if ep.name in matched else fallback[i]
                for i, ep in enumerate(endpoints)]

    def on_dispatch(self, state: CycleState, request: LLMRequest, endpoint: Endpoint) -> None:
        self.approximate.on_dispatch(state, request, endpoint)
        if not self.pool_events.trustworthy(endpoint.name):
            return  # no index to complement; the approximate history covers it
        hashes = self.block_hashes(state, request)
        if hashes:
            self.pool_events.mark_pending(endpoint.name, hashes, endpoint.kv_capacity_blocks)
