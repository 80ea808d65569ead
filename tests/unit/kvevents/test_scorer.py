"""The prefix-precise scorer's fallback rules (the precise path runs e2e on real engines)."""

from __future__ import annotations

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.request import LLMRequest
from kvroute_router.kvevents.hashing import BlockHashConfig
from kvroute_router.kvevents.hub import PoolKVEvents
from kvroute_router.openai.requests import parse_request
from kvroute_router.plugins.prefix_approx import ApproxPrefixIndex, ApproxPrefixScorer
from kvroute_router.plugins.prefix_precise import STATE_HASHES, PrecisePrefixScorer


def test_endpoints_without_events_use_the_approximate_score() -> None:
    events = PoolKVEvents(BlockHashConfig(block_size=4))
    approximate = ApproxPrefixScorer(ApproxPrefixIndex(), 8, 4)
    scorer = PrecisePrefixScorer(events, approximate)
    endpoints = [Endpoint(name="a", address="127.0.0.1:1", pool="p"),
                 Endpoint(name="b", address="127.0.0.1:2", pool="p")]
    request = LLMRequest(model="m", token_ids=list(range(16)))
    first = CycleState()
    scorer.on_dispatch(first, request, endpoints[1])
    events.index.store("a", events.hasher.block_hashes(list(range(16))))  # untrusted: ignored
    scores = scorer.score(CycleState(), request, endpoints)
    assert scores == [0.0, 1.0]
    sample = events.metrics.registry.get_sample_value(
        "kvroute_kv_prefix_scorer_source_total", {"source": "approximate"})
    assert sample == 2


def test_hashes_are_computed_once_per_cycle_and_lora_falls_back() -> None:
    events = PoolKVEvents(BlockHashConfig(block_size=4))
    scorer = PrecisePrefixScorer(events, ApproxPrefixScorer(ApproxPrefixIndex(), 8, 4))
    state = CycleState()
    request = LLMRequest(model="m", token_ids=list(range(9)), openai=parse_request(
        {"model": "m", "prompt": list(range(9)), "cache_salt": "tenant-a"}, "completions"))
    hashes = scorer.block_hashes(state, request)
    assert hashes == events.hasher.block_hashes(list(range(9)), cache_salt="tenant-a")
    assert state.read(STATE_HASHES, list) == hashes
    lora = LLMRequest(model="adapter", token_ids=list(range(9)), lora_adapter="adapter")
    assert scorer.block_hashes(CycleState(), lora) is None
