"""The ``load-headroom`` filter: prefix affinity only among endpoints that are not saturated."""

from __future__ import annotations

import random
import time

import numpy as np
from kvroute_api.route_policy import AdmissionSpec, ScoringSpec
from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint, EndpointMetrics
from kvroute_router.framework.profile import build_profile
from kvroute_router.framework.registry import PluginContext, PluginRegistry, SharedServices
from kvroute_router.framework.request import LLMRequest
from kvroute_router.plugins import register_builtin_plugins
from kvroute_router.plugins.load_headroom import (
    STATE_SATURATED,
    LoadHeadroomFilter,
    reference_queue,
)
from kvroute_router.plugins.max_score import MaxScorePicker

PROMPT = "system prompt of the hot tenant " * 64


def endpoint(name: str, waiting: float = 0.0, kv: float = 0.1, since_scrape: int = 0,
             age_s: float = 0.0) -> Endpoint:
    ep = Endpoint(name=name, address=f"{name}:8000", pool="default/p")
    ep.metrics = EndpointMetrics(waiting=waiting, kv_cache_usage=kv,
                                 scraped_at=time.monotonic() - age_s)
    ep.unseen = dict.fromkeys(range(since_scrape))
    return ep


def names(eps: list[Endpoint]) -> list[str]:
    return [ep.name for ep in eps]


def test_keeps_endpoints_below_the_queue_and_kv_thresholds() -> None:
    flt = LoadHeadroomFilter(max_waiting=4, max_kv_utilization=0.9)
    eps = [endpoint("a"), endpoint("b", waiting=4), endpoint("c", kv=0.95),
           endpoint("d", waiting=2, since_scrape=2), endpoint("e", waiting=3, kv=0.5),
           endpoint("f"), endpoint("g")]
    state = CycleState()  # the median queue is 0
    assert names(flt.filter(state, LLMRequest(model="m"), eps)) == ["a", "e", "f", "g"]
    assert state.read(STATE_SATURATED, list) == ["b", "c", "d"]


def test_none_with_headroom_keeps_the_least_queued() -> None:
    """Only the KV rule can leave none (the median endpoint is never deeper than itself)."""
    flt = LoadHeadroomFilter(max_waiting=2, max_kv_utilization=0.9)
    eps = [endpoint("a", waiting=5, kv=0.95), endpoint("b", waiting=3, kv=0.95),
           endpoint("c", waiting=3, kv=0.95), endpoint("d", waiting=1, kv=0.99)]
    assert names(flt.filter(CycleState(), LLMRequest(model="m"), eps)) == ["d"]
    eps = eps[:3]
    assert names(flt.filter(CycleState(), LLMRequest(model="m"), eps)) == ["b", "c"]


def test_stale_metrics_count_only_the_routers_own_dispatches() -> None:
    flt = LoadHeadroomFilter(max_waiting=3, stale_after_s=1.0)
    eps = [endpoint("old-busy", waiting=50, kv=1.0, age_s=10),
           endpoint("old-sent", age_s=10, since_scrape=3), endpoint("never")]
    eps[2].metrics = None
    assert names(flt.filter(CycleState(), LLMRequest(model="m"), eps)) == ["old-busy", "never"]


def test_single_endpoint_is_never_filtered() -> None:
    flt = LoadHeadroomFilter(max_waiting=1)
    eps = [endpoint("a", waiting=9, kv=1.0)]
    assert names(flt.filter(CycleState(), LLMRequest(model="m"), eps)) == ["a"]


def test_threshold_comes_from_admission_saturation_queue_depth() -> None:
    registry = register_builtin_plugins(PluginRegistry())
    scoring = ScoringSpec()
    ctx = PluginContext(scoring=scoring, pool_key="default/p", pool=None,
                        services=SharedServices(),
                        admission=AdmissionSpec.model_validate({"saturationQueueDepth": 3}))
    profile = build_profile(registry, ctx, "t")
    flt = next(f for f in profile.filters if isinstance(f, LoadHeadroomFilter))
    assert flt.max_waiting == 3
    default = build_profile(registry, PluginContext(scoring=scoring, pool_key="default/p",
                                                    pool=None, services=SharedServices()), "t")
    flt = next(f for f in default.filters if isinstance(f, LoadHeadroomFilter))
    assert flt.max_waiting == AdmissionSpec().saturation_queue_depth


def test_kv_threshold_comes_from_admission_saturation_kv_utilization() -> None:
    registry = register_builtin_plugins(PluginRegistry())
    admission = AdmissionSpec.model_validate({"saturationKvUtilization": 0.5})
    ctx = PluginContext(scoring=ScoringSpec(), pool_key="default/p", pool=None,
                        services=SharedServices(), admission=admission)
    flt = next(f for f in build_profile(registry, ctx, "t").filters
               if isinstance(f, LoadHeadroomFilter))
    assert flt.max_kv_utilization == 0.5
    eps = [endpoint("a", kv=0.6), endpoint("b", kv=0.4)]
    assert names(flt.filter(CycleState(), LLMRequest(model="m"), eps)) == ["b"]


def test_hot_prefix_stops_attracting_requests_to_a_saturated_endpoint() -> None:
    """Weighted scoring (prefix weight 3, queue-depth, kv-utilization; the default before
    prefill-cost): the endpoint holding the hot prompt wins while it has headroom, and loses it
    as soon as its queue reaches the saturation depth, although its prefix score is still
    perfect."""
    registry = register_builtin_plugins(PluginRegistry())
    weighted = ScoringSpec.model_validate({"scorers": [
        {"type": "prefix-precise", "weight": 3}, {"type": "queue-depth"},
        {"type": "kv-utilization"}]})
    ctx = PluginContext(scoring=weighted, pool_key="default/p", pool=None,
                        services=SharedServices(),
                        admission=AdmissionSpec.model_validate({"saturationQueueDepth": 4}))
    profile = build_profile(registry, ctx, "t")
    profile.picker = MaxScorePicker(random.Random(0))
    hot, other = endpoint("hot"), endpoint("other")

    def route() -> str:
        state = CycleState()
        request = LLMRequest(model="m", prompt_text=PROMPT)
        chosen = profile.run(state, request, [hot, other], limit=1)[0]
        profile.dispatched(state, request, chosen.endpoint)
        return chosen.endpoint.name

    profile.dispatched(CycleState(), LLMRequest(model="m", prompt_text=PROMPT), hot)

    # Some load on the holder, none elsewhere: the prefix match still wins below saturation.
    hot.metrics = endpoint("x", waiting=3, kv=0.6).metrics
    assert [route() for _ in range(3)] == ["hot", "hot", "hot"]

    # At the saturation depth the holder is filtered out: the hot prefix goes elsewhere.
    hot.metrics = endpoint("x", waiting=4, kv=0.6).metrics
    assert route() == "other"
    # ... and the new holder keeps it while the old one stays saturated.
    other.metrics = endpoint("x", waiting=1, kv=0.3).metrics
    assert route() == "other"

    # Once the first holder drains, both hold the prefix; the less loaded one wins.
    hot.metrics = endpoint("x", waiting=0, kv=0.2).metrics
    assert route() == "hot"


def test_a_fleet_wide_overload_keeps_tenants_on_their_holders() -> None:
    """Every engine queues (all past saturationQueueDepth): no holder runs ahead of the
    others, so the prefix keeps deciding — moving the tenant would recompute its context
    elsewhere. (The absolute rule sent it to the least-queued engine instead.)"""
    registry = register_builtin_plugins(PluginRegistry())
    ctx = PluginContext(scoring=ScoringSpec(), pool_key="default/p", pool=None,
                        services=SharedServices(),
                        admission=AdmissionSpec.model_validate({"saturationQueueDepth": 8}))
    profile = build_profile(registry, ctx, "t")
    profile.picker = MaxScorePicker(random.Random(0))
    holder, others = endpoint("holder", waiting=11, kv=0.99), [
        endpoint(f"busy-{i}", waiting=10, kv=0.97) for i in range(3)]
    profile.dispatched(CycleState(), LLMRequest(model="m", prompt_text=PROMPT), holder)
    request = LLMRequest(model="m", prompt_text=PROMPT)
    chosen = profile.run(CycleState(), request, [holder, *others], limit=1)[0]
    assert chosen.endpoint.name == "holder"
    # A hot spot still loses headroom: the holder 8 deeper than the median (here also the
    # least-queued).
    holder.metrics = endpoint("x", waiting=18, kv=0.99).metrics
    chosen = profile.run(CycleState(), request, [holder, *others], limit=1)[0]
    assert chosen.endpoint.name != "holder"


def test_a_busy_fleets_spread_of_queues_is_not_a_hot_spot() -> None:
    """Past saturation the engines' queues spread (the fleet simulator at 16 engines: least
    6, median 11, deepest 13 at a typical decision). Measured from the least-queued engine,
    every holder 8 deeper lost headroom and its tenant's request was recomputed elsewhere;
    measured from the median, none is a hot spot (docs/benchmarks/emulated-fleet.md,
    round 11)."""
    flt = LoadHeadroomFilter(max_waiting=8)
    busy = [endpoint(f"busy-{i}", waiting=w)
            for i, w in enumerate([6, 7, 8, 9, 10, 10, 11, 11, 11, 12, 12, 12, 13, 13, 14])]
    holder = endpoint("holder", waiting=14)
    state = CycleState()
    kept = flt.filter(state, LLMRequest(model="m"), [holder, *busy])
    assert names(kept) == names([holder, *busy])
    assert state.read(STATE_SATURATED, list) is None


def test_one_quiet_engine_does_not_take_the_busy_holders_headroom() -> None:
    """A new or drained engine among busy ones: the busy prefix holders keep their headroom
    (prefill-cost weighs their backlog against recomputing elsewhere), at 16 engines as at
    64."""
    flt = LoadHeadroomFilter(max_waiting=8)
    for count in (16, 64):
        busy = [endpoint(f"busy-{i}", waiting=12 + i % 5) for i in range(count - 1)]
        quiet = endpoint("quiet", waiting=0)
        kept = flt.filter(CycleState(), LLMRequest(model="m"), [*busy, quiet])
        assert len(kept) == count


def test_hot_spots_still_lose_headroom_at_any_fleet_size() -> None:
    flt = LoadHeadroomFilter(max_waiting=8)
    for calm_count, hot_count in ((12, 4), (60, 4), (3, 1), (1, 1)):
        calm = [endpoint(f"calm-{i}", waiting=i % 3) for i in range(calm_count)]
        hot = [endpoint(f"hot-{i}", waiting=20) for i in range(hot_count)]
        state = CycleState()
        kept = flt.filter(state, LLMRequest(model="m"), [*hot, *calm])
        assert names(kept) == names(calm)
        assert state.read(STATE_SATURATED, list) == names(hot)


def test_reference_queue_is_the_lower_median() -> None:
    for count in (1, 2, 3, 4, 15, 16, 17, 64, 100):
        waiting = np.array([float((7 * i) % count) for i in range(count)])
        assert reference_queue(waiting) == sorted(waiting.tolist())[(count + 1) // 2 - 1]


def test_without_the_filter_the_same_load_cannot_outvote_the_prefix() -> None:
    """What the filter fixes: with scorers alone, a saturated holder keeps winning."""
    registry = register_builtin_plugins(PluginRegistry())
    registry.register("load-headroom", "filter",
                      lambda ctx: LoadHeadroomFilter(max_waiting=float("inf"),
                                                     max_kv_utilization=float("inf")))
    profile = build_profile(registry, PluginContext(scoring=ScoringSpec(), pool_key="d/p",
                                                    pool=None, services=SharedServices()), "t")
    hot, other = endpoint("hot", waiting=50, kv=0.9), endpoint("other")
    state = CycleState()
    request = LLMRequest(model="m", prompt_text=PROMPT)
    profile.dispatched(state, request, hot)
    chosen = profile.run(CycleState(), request, [hot, other], limit=1)[0]
    assert chosen.endpoint.name == "hot"


def test_saturated_endpoints_remain_last_resort_retry_targets() -> None:
    """The filter narrows who is tried first, not who may be tried at all: a request whose
    only unsaturated endpoint fails must still have somewhere to retry."""
    registry = register_builtin_plugins(PluginRegistry())
    ctx = PluginContext(scoring=ScoringSpec(), pool_key="default/p", pool=None,
                        services=SharedServices(),
                        admission=AdmissionSpec.model_validate({"saturationQueueDepth": 2}))
    profile = build_profile(registry, ctx, "t")
    eps = [endpoint("busy-1", waiting=5), endpoint("idle"), endpoint("busy-2", waiting=7),
           endpoint("idle-2")]
    ranked = profile.run(CycleState(), LLMRequest(model="m", prompt_text=PROMPT), eps, limit=4)
    assert sorted(s.endpoint.name for s in ranked[:2]) == ["idle", "idle-2"]
    assert sorted(s.endpoint.name for s in ranked[2:]) == ["busy-1", "busy-2"]
    assert len(profile.run(CycleState(), LLMRequest(model="m"), eps, limit=2)) == 2
