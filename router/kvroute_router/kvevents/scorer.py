"""``prefix-precise``: scores endpoints by the prompt prefix their KV cache *really* holds.

The prompt is tokenised as the engine does (:mod:`.tokenization`), hashed into vLLM block
hashes (:mod:`.hashing`), and looked up in the pool's :class:`~.index.PrefixIndex`, which the
engines' KV events keep current. An endpoint's score is the share of the prompt's full blocks
that form a prefix it holds.

Per endpoint, the scorer falls back to the approximate scorer (``prefix-approx``, the router's
own history) when that endpoint's index cannot be trusted: no subscriber, disconnected, not in
sequence yet, or its hashes do not reproduce (the self-check alarm). The whole request falls
back when the prompt cannot be tokenised in process (no tokenizer files, tools, LoRA adapters
whose path the router does not know). Dispatches are always recorded in the approximate history
so the fallback stays warm.

A dispatch to a trusted endpoint also marks the prompt's blocks *pending* there
(:meth:`~.index.PrefixIndex.mark_pending`): vLLM publishes a block only after computing it, so
without the mark a second request for the same prefix arriving during the first one's prefill
would not be drawn to that engine. The mark lasts until the engine's events publish or remove
the block, the endpoint's index is cleared, or a few seconds pass.

Registration (``kvroute_router.plugins.register_builtin_plugins`` or the router's start-up)::

    registry.register(PrecisePrefixScorer.TYPE, "scorer", PrecisePrefixScorer.build)

``build`` finds the pool's :class:`~.hub.PoolKVEvents` in the shared services under
``kvevents/<pool key>`` (the router puts it there and feeds it endpoints); without one it
creates an index nobody feeds, so every endpoint falls back to approximate scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.registry import PluginContext
from kvroute_router.framework.request import LLMRequest
from kvroute_router.kvevents.hashing import BlockHashConfig
from kvroute_router.kvevents.hub import PoolKVEvents, hash_config_for_pool
from kvroute_router.plugins.prefix_approx import ApproxPrefixScorer

STATE_HASHES = "prefix-precise/hashes"
STATE_MATCH = "prefix-precise/match"
STATE_UNHASHABLE = "prefix-precise/unhashable"
"""CycleState keys: the prompt's block hashes (list[int]), computed once per request and read
by every later step (re-scoring, the approximate fallback's bookkeeping, logging); the precise
match per endpoint name in blocks (dict[str, int]; endpoints scored approximately are absent);
and a marker (``True``) that the hashes cannot be computed in process, so a second scoring of
the same request does not try again."""


def services_key(pool_key: str) -> str:
    return f"kvevents/{pool_key}"


class PrecisePrefixScorer:
    """Share of the prompt's blocks each endpoint holds, from KV events."""

    TYPE: ClassVar[str] = "prefix-precise"

    def __init__(self, pool_events: PoolKVEvents, approximate: ApproxPrefixScorer) -> None:
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
        tokenizer = self.pool_events.tokenizer
        tokens: list[int] | None
        if request.token_ids is not None:
            tokens = list(request.token_ids)
        elif tokenizer is None:
            return None
        elif request.openai is not None:
            tokens = tokenizer.tokenize_request(request.openai)
        else:
            tokens = tokenizer.tokenize(request.kind, None, prompt_text=request.prompt_text)
        if tokens is None:
            return None
        salt = request.openai.cache_salt if request.openai is not None else None
        return self.pool_events.hasher.block_hashes(tokens, cache_salt=salt)

    def score(self, state: CycleState, request: LLMRequest,
              endpoints: Sequence[Endpoint]) -> list[float]:
        metrics = self.pool_events.metrics
        hashes = self.block_hashes(state, request)
        precise = [ep for ep in endpoints if self.pool_events.trustworthy(ep.name)]
        if hashes is None or len(precise) < len(endpoints):
            fallback = self.approximate.score(state, request, endpoints)
        else:
            fallback = [0.0] * len(endpoints)
        if hashes is None:
            metrics.scorer_source.labels("approximate").inc(len(endpoints))
            return list(fallback)
        if not hashes:
            return [0.0] * len(endpoints)
        matched = self.pool_events.index.match(hashes, [ep.name for ep in precise])
        state.write(STATE_MATCH, matched)
        if matched:
            metrics.match_blocks.observe(max(matched.values()))
        metrics.scorer_source.labels("precise").inc(len(precise))
        if len(precise) < len(endpoints):
            metrics.scorer_source.labels("approximate").inc(len(endpoints) - len(precise))
        total = len(hashes)
        return [matched[ep.name] / total if ep.name in matched else fallback[i]
                for i, ep in enumerate(endpoints)]

    def on_dispatch(self, state: CycleState, request: LLMRequest, endpoint: Endpoint) -> None:
        self.approximate.on_dispatch(state, request, endpoint)
        if not self.pool_events.trustworthy(endpoint.name):
            return  # no index to complement; the approximate history covers it
        hashes = self.block_hashes(state, request)
        if hashes:
            self.pool_events.index.mark_pending(endpoint.name, hashes)

    @classmethod
    def build(cls, context: PluginContext) -> PrecisePrefixScorer:
        config = (hash_config_for_pool(context.pool) if context.pool
                  else BlockHashConfig(block_size=16))
        pool_events = context.services.get_or_create(
            services_key(context.pool_key), PoolKVEvents, lambda: PoolKVEvents(config))
        return cls(pool_events, ApproxPrefixScorer.build(context))
