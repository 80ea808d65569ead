"""The eviction forecast: a dispatch to a full endpoint hides the blocks it will evict there
until the engine confirms, at most ``pending_ttl`` seconds.

vLLM evicts when it schedules the request that needs the room and says so (``BlockRemoved``)
when that step ends; without the forecast the index keeps showing the doomed context for that
long and draws its tenant's next requests to an engine that computes it again.

Deterministic: the index reads an injected clock, no sleeping and no timing thresholds.
"""

from __future__ import annotations

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint, EndpointMetrics
from kvroute_router.framework.request import LLMRequest
from kvroute_router.kvevents.hashing import BlockHashConfig
from kvroute_router.kvevents.hub import PoolKVEvents
from kvroute_router.kvevents.index import PrefixIndex
from kvroute_router.plugins.prefix_approx import ApproxPrefixIndex, ApproxPrefixScorer
from kvroute_router.plugins.prefix_precise import PrecisePrefixScorer

A = [11, 12, 13, 14]  # one tenant's context, head first
B = [21, 22, 23, 24]
C = [31, 32, 33, 34]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _full_index(clock: FakeClock, forecast: bool = True) -> PrefixIndex:
    """Endpoint ``a`` holds A then B: 8 blocks, its whole capacity in these tests."""
    index = PrefixIndex(pending_ttl=5.0, clock=clock, forecast_evictions=forecast)
    index.store("a", A)
    index.store("a", B)
    index.add_endpoint("b")
    return index


def test_a_dispatch_to_a_full_endpoint_hides_what_it_will_evict_until_the_engine_confirms(
        ) -> None:
    clock = FakeClock()
    index = _full_index(clock)
    index.mark_pending("a", C, capacity=8)  # four new blocks: A, the oldest, makes the room
    assert index.match(A, ["a", "b"]) == {"a": 0, "b": 0}
    assert index.match(B, ["a"]) == {"a": 4}
    assert index.match(C, ["a"]) == {"a": 4}  # pending
    # The engine's step ends: C stored, A removed (tail first, as vLLM frees).
    index.store("a", C)
    assert index.remove("a", list(reversed(A))) == 4
    assert index.forecast_counts() == {"a": (4, 4, 0), "b": (0, 0, 0)}
    assert index.block_count("a") == 8
    clock.now += 60  # nothing left to restore
    assert index.match(A, ["a"]) == {"a": 0}


def test_without_the_forecast_the_doomed_context_is_shown_until_the_engine_says_so() -> None:
    clock = FakeClock()
    index = _full_index(clock, forecast=False)
    index.mark_pending("a", C, capacity=8)
    assert index.match(A, ["a"]) == {"a": 4}
    assert index.forecast_counts()["a"] == (0, 0, 0)


def test_no_capacity_or_room_to_spare_forecasts_nothing() -> None:
    clock = FakeClock()
    index = _full_index(clock)
    index.mark_pending("a", C)  # capacity unknown (no scrape yet)
    index.mark_pending("a", [41, 42], capacity=14)  # 8 held + 6 pending fit
    assert index.match(A, ["a"]) == {"a": 4}
    assert index.forecast_counts()["a"] == (0, 0, 0)


def test_a_context_in_use_is_evicted_last_and_from_its_tail() -> None:
    clock = FakeClock()
    index = _full_index(clock)
    # Requests for A, then B, are dispatched (hits): both in use, A the less recent one.
    index.mark_pending("a", A, capacity=8)
    index.mark_pending("a", B, capacity=8)
    index.mark_pending("a", C[:2], capacity=8)  # two new blocks: A's tail makes the room
    assert index.match(A, ["a"]) == {"a": 2}  # vLLM frees a request's blocks tail first
    assert index.match(B, ["a"]) == {"a": 4}
    index.mark_pending("a", [*C[2:], 35, 36, 37], capacity=8)  # five more: A's head, B's tail
    assert index.match(A, ["a"]) == {"a": 0}
    assert index.match(B, ["a"]) == {"a": 1}


def test_a_forecast_the_engine_does_not_confirm_expires_back_to_the_least_recent_end() -> None:
    clock = FakeClock()
    index = _full_index(clock)
    index.mark_pending("a", C[:2], capacity=8)  # dooms A's first two blocks (A: least recent)
    assert index.match(A, ["a"]) == {"a": 0}
    index.store("a", C[:2])  # the engine stored C's blocks but evicted B's instead
    index.remove("a", B[:2])
    clock.now += 4.9
    assert index.match(A, ["a"]) == {"a": 0}
    clock.now += 0.1
    assert index.match(A, ["a"]) == {"a": 4}  # counts again...
    assert index.forecast_counts()["a"] == (2, 0, 2)
    index.mark_pending("a", [51], capacity=8)  # ...and is still first to go
    assert index.match(A, ["a"]) == {"a": 0}
    assert index.match(C[:2], ["a"]) == {"a": 2}


def test_a_block_stored_again_while_doomed_counts_at_once_and_clear_drops_the_forecast() -> None:
    clock = FakeClock()
    index = _full_index(clock)
    index.mark_pending("a", C, capacity=8)
    index.store("a", A[:1])  # the engine kept (and re-announced) A's head
    assert index.match(A, ["a"]) == {"a": 1}
    assert index.forecast_counts()["a"] == (4, 0, 1)
    index.clear("a")  # engine restart: nothing held, nothing doomed
    clock.now += 10
    assert index.match(A, ["a"]) == {"a": 0}
    assert index.entries() == 0


def test_the_scorer_forecasts_with_the_capacity_the_engine_reports() -> None:
    clock = FakeClock()

    class TrustedEvents(PoolKVEvents):
        def trustworthy(self, endpoint: str) -> bool:
            return True

    events = TrustedEvents(BlockHashConfig(block_size=4))
    events.index = PrefixIndex(pending_ttl=5.0, clock=clock, forecast_evictions=True)
    scorer = PrecisePrefixScorer(events, ApproxPrefixScorer(ApproxPrefixIndex(), 8, 4))
    full = Endpoint(name="a", address="127.0.0.1:1", pool="p",
                    metrics=EndpointMetrics(num_gpu_blocks=4))
    held = list(range(16))
    events.index.store("a", events.hasher.block_hashes(held))
    state = CycleState()
    assert scorer.score(state, LLMRequest(model="m", token_ids=held), [full]) == [1.0]
    scorer.on_dispatch(state, LLMRequest(model="m", token_ids=held), full)  # a hit: in use
    other = LLMRequest(model="m", token_ids=list(range(100, 108)))
    scorer.on_dispatch(CycleState(), other, full)  # two new blocks evict the context's tail
    assert scorer.score(CycleState(), LLMRequest(model="m", token_ids=held), [full]) == [0.5]
    unknown = Endpoint(name="a", address="127.0.0.1:1", pool="p")  # not scraped yet
    scorer.on_dispatch(CycleState(), LLMRequest(model="m", token_ids=list(range(200, 216))),
                       unknown)
    assert scorer.score(CycleState(), LLMRequest(model="m", token_ids=held), [full]) == [0.5]


def test_the_forecasts_are_exported_per_endpoint_and_outcome() -> None:
    events = PoolKVEvents(BlockHashConfig(block_size=4))
    events.index.store("a", A + B)
    events.index.mark_pending("a", C, capacity=8)
    events.index.remove("a", A)
    # A second pool sharing the metrics (one registry) adds its endpoints to the same family.
    other = PoolKVEvents(BlockHashConfig(block_size=4), metrics=events.metrics)
    other.index.store("z", A)
    samples = {(s.labels["endpoint"], s.labels["outcome"]): s.value
               for family in events.metrics.registry.collect()
               if family.name == "kvroute_kv_index_forecast_blocks"
               for s in family.samples}
    assert samples == {("a", "doomed"): 4, ("a", "confirmed"): 4, ("a", "restored"): 0,
                       ("z", "doomed"): 0, ("z", "confirmed"): 0, ("z", "restored"): 0}


def test_dispatched_blocks_are_exported_per_endpoint_and_state() -> None:
    events = PoolKVEvents(BlockHashConfig(block_size=4))
    events.index.store("a", A)
    events.index.store("b", B)
    events.index.remove("b", B)  # evicted
    events.index.mark_pending("a", A + B + C)
    samples = {s.labels["state"]: s.value
               for family in events.metrics.registry.collect()
               if family.name == "kvroute_kv_dispatch_blocks"
               for s in family.samples if s.labels["endpoint"] == "a"}
    assert samples == {"held": len(A), "computing": 0, "held_elsewhere": 0,
                       "evicted": len(B), "new": len(C)}
