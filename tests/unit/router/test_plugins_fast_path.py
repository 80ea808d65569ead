"""The vectorised decision path ranks exactly as the per-endpoint definitions do.

* ``LoadEstimates`` (one pass over a pool, NumPy) equals ``Endpoint.waiting_estimate`` /
  ``running_estimate`` / ``kv_usage_estimate`` entry by entry, stale and missing metrics
  included;
* the pickers' ``pick_indices`` (used by ``SchedulerProfile.run``) returns the order their
  ``pick`` returns, drawing the same random numbers;
* a profile ranks identically through ``pick_indices`` and through the generic ``pick`` path;
* soft filters run after hard ones whatever order the profile was given.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest
from kvroute_api.route_policy import ScoringSpec
from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint, EndpointMetrics, LoadEstimates
from kvroute_router.framework.plugins import ScoredEndpoint
from kvroute_router.framework.profile import SchedulerProfile, build_profile
from kvroute_router.framework.registry import PluginContext, PluginRegistry, SharedServices
from kvroute_router.framework.request import LLMRequest
from kvroute_router.plugins import register_builtin_plugins
from kvroute_router.plugins.max_score import MaxScorePicker
from kvroute_router.plugins.weighted_random import WeightedRandomPicker

NOW = 1000.0


def random_endpoints(rng: random.Random, n: int) -> list[Endpoint]:
    eps = []
    for i in range(n):
        ep = Endpoint(name=f"e{i}", address=f"10.0.0.{i}:8000", pool="default/p",
                      in_flight=rng.randrange(6), unseen=dict.fromkeys(range(rng.randrange(4))),
                      left_since_snapshot=rng.randrange(3))
        kind = rng.random()
        if kind > 0.1:  # fresh, stale (0.1 < kind < 0.25) or missing (<= 0.1)
            age = rng.uniform(0.0, 0.9) if kind > 0.25 else rng.uniform(1.1, 5.0)
            ep.metrics = EndpointMetrics(
                running=float(rng.randrange(8)), waiting=float(rng.randrange(12)),
                kv_cache_usage=rng.choice([0.0, 0.5, 0.94, 0.95, 0.99, rng.random()]),
                scraped_at=NOW - age)
        eps.append(ep)
    return eps


@pytest.mark.parametrize("seed", range(8))
def test_load_estimates_equal_the_endpoint_estimates(seed: int) -> None:
    rng = random.Random(seed)
    eps = random_endpoints(rng, 40)
    loads = LoadEstimates.of(eps, 1.0, NOW)
    for stale_value in (0.0, 2.5):
        assert loads.waiting(stale_value).tolist() == [
            ep.waiting_estimate(1.0, NOW, stale_value) for ep in eps]
        assert loads.running(stale_value).tolist() == [
            ep.running_estimate(1.0, NOW, stale_value) for ep in eps]
        assert loads.kv_usage(stale_value).tolist() == [
            ep.kv_usage_estimate(1.0, NOW, stale_value) for ep in eps]
    # the fresh pages' waiting counts, less their requests answered since
    fresh = [max(0.0, m.waiting - ep.left_since_snapshot) for ep in eps
             if (m := ep.fresh_metrics(1.0, NOW)) is not None]
    average = sum(fresh) / len(fresh)
    assert loads.waiting(None).tolist() == [
        ep.waiting_estimate(1.0, NOW, average) for ep in eps]


def test_endpoint_estimates_without_a_clock_ignore_age() -> None:
    ep = Endpoint(name="e", address="a:1", pool="p", in_flight=5, unseen={1: None, 2: None},
                  metrics=EndpointMetrics(running=3.0, waiting=4.0, scraped_at=0.0))
    assert ep.waiting_estimate() == 6.0
    assert ep.running_estimate() == 5.0
    assert ep.waiting_estimate(1.0, 100.0) == 2.0  # stale: own dispatches only
    assert ep.running_estimate(1.0, 100.0, stale_value=7.0) == 7.0


def test_load_estimates_are_shared_within_a_cycle() -> None:
    eps = random_endpoints(random.Random(1), 10)
    state = CycleState()
    first = LoadEstimates.for_cycle(state, eps, 1.0, NOW)
    assert LoadEstimates.for_cycle(state, eps, 1.0, NOW + 5) is first
    assert LoadEstimates.for_cycle(state, list(eps), 1.0, NOW) is not first
    assert LoadEstimates.for_cycle(state, eps, 2.0, NOW) is not first


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [1, 3, 50])
def test_pick_indices_order_as_pick(seed: int, limit: int) -> None:
    rng = random.Random(seed)
    eps = random_endpoints(rng, 30)
    # Coarse totals make many ties, fine noise tests the rounding to 9 decimals.
    totals = [rng.choice([0.0, 1.0, 2.5, 3.0]) + rng.choice([0.0, 1e-12, 3e-10, 2e-9, 1e-6])
              for _ in eps]
    scored = [ScoredEndpoint(ep, t) for ep, t in zip(eps, totals, strict=True)]
    request = LLMRequest(model="m")
    for picker_type in (MaxScorePicker, WeightedRandomPicker):
        by_pick = picker_type(random.Random(seed)).pick(CycleState(), request, scored, limit)
        fast = picker_type(random.Random(seed))
        by_index = fast.pick_indices(CycleState(), request, np.array(totals), limit)
        assert [s.endpoint.name for s in by_pick] == [eps[i].name for i in by_index]


class PickOnly:
    """A picker without ``pick_indices``: the profile's generic path."""

    def __init__(self, inner: MaxScorePicker | WeightedRandomPicker) -> None:
        self.inner = inner
        self.name = inner.name

    def pick(self, state: CycleState, request: LLMRequest, scored: Sequence[ScoredEndpoint],
             limit: int) -> list[ScoredEndpoint]:
        return self.inner.pick(state, request, scored, limit)


@pytest.mark.parametrize("picker", ["max-score", "weighted-random"])
def test_profile_ranks_alike_through_either_picker_path(picker: str) -> None:
    rng = random.Random(7)
    scoring = ScoringSpec.model_validate({"picker": picker, "scorers": [
        {"type": "prefix-approx", "weight": 3}, {"type": "queue-depth", "weight": 1},
        {"type": "kv-utilization", "weight": 1}, {"type": "running-requests", "weight": 2}]})
    registry = register_builtin_plugins(PluginRegistry())
    profiles = []
    for _ in range(2):
        ctx = PluginContext(scoring=scoring, pool_key="default/p", pool=None,
                            services=SharedServices())
        profiles.append(build_profile(registry, ctx, "t"))
    fast, generic = profiles
    assert isinstance(fast.picker, MaxScorePicker | WeightedRandomPicker)
    fast.picker.rng = random.Random(3)
    generic.picker = PickOnly(type(fast.picker)(random.Random(3)))
    eps = random_endpoints(rng, 64)
    for ep in eps:  # fresh metrics on the wall clock the plugins read
        if ep.metrics is not None:
            ep.metrics = EndpointMetrics(running=ep.metrics.running,
                                         waiting=ep.metrics.waiting,
                                         kv_cache_usage=ep.metrics.kv_cache_usage,
                                         scraped_at=float("inf"))
    prompts = [f"tenant {rng.randrange(5)} " * 80 + str(i) for i in range(40)]
    for prompt in prompts:
        request = LLMRequest(model="m", prompt_text=prompt)
        a = fast.run(CycleState(), request, eps, 3)
        b = generic.run(CycleState(), request, eps, 3)
        assert [(s.endpoint.name, s.total, s.by_scorer) for s in a] == \
            [(s.endpoint.name, s.total, s.by_scorer) for s in b]
        for profile in profiles:  # both learn the same history
            profile.dispatched(CycleState(), request, a[0].endpoint)
        a[0].endpoint.dispatched()


def test_soft_filters_run_after_hard_ones() -> None:
    class Soft:
        SOFT = True
        name = "soft"

        def filter(self, state: CycleState, request: LLMRequest,
                   eps: Sequence[Endpoint]) -> list[Endpoint]:
            return [ep for ep in eps if ep.name != "busy"]

    class Hard:
        name = "hard"

        def filter(self, state: CycleState, request: LLMRequest,
                   eps: Sequence[Endpoint]) -> list[Endpoint]:
            return [ep for ep in eps if ep.name != "down"]

    soft, hard = Soft(), Hard()
    profile = SchedulerProfile(name="t", filters=[soft, hard], scorers=[],
                               picker=MaxScorePicker(random.Random(0)))
    assert profile.filters == [hard, soft]
    eps = [Endpoint(name=n, address=f"{n}:1", pool="p") for n in ("ok", "busy", "down")]
    ranked = profile.run(CycleState(), LLMRequest(model="m"), eps, 3)
    # "busy" stays a last-resort retry target; "down" (removed by a hard filter) never is.
    assert [s.endpoint.name for s in ranked] == ["ok", "busy"]
