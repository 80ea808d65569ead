"""Profiles from RoutePolicy.spec.scoring: degradation of missing scorers, clamping, pickers."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from kvroute_api.route_policy import ScoringSpec
from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.plugins import ScoredEndpoint
from kvroute_router.framework.profile import ProfileBuildError, build_profile
from kvroute_router.framework.registry import PluginContext, PluginRegistry, SharedServices
from kvroute_router.framework.request import LLMRequest
from kvroute_router.plugins import register_builtin_plugins
from kvroute_router.plugins.max_score import MaxScorePicker
from kvroute_router.plugins.weighted_random import WeightedRandomPicker


def context(**scoring: object) -> PluginContext:
    return PluginContext(scoring=ScoringSpec.model_validate(scoring, by_alias=True),
                         pool_key="default/p", pool=None, services=SharedServices())


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(name=f"e{i}", address=f"127.0.0.1:{9000 + i}", pool="default/p")
            for i in range(n)]


def test_default_scoring_degrades_prefix_precise_to_approx(caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    registry = register_builtin_plugins(PluginRegistry())
    with caplog.at_level(logging.WARNING):
        profile = build_profile(registry, context(), "test")
    # The default [prefix-precise 0, prefill-cost 1, running-requests 0.02]: the stand-in
    # keeps weight 0 and still runs, because prefill-cost prices its match.
    assert [(s.type_name, s.weight) for s in profile.scorers] == [
        ("prefix-approx", 0.0), ("prefill-cost", 1.0), ("running-requests", 0.02)]
    assert profile.share_prefix_held
    assert profile.degraded == {"prefix-precise": "prefix-approx"}
    assert "prefix-precise is not available" in caplog.text
    assert [f.name for f in profile.filters] == ["subset-filter", "healthy-filter",
                                                 "load-headroom"]


def test_registered_precise_scorer_is_used_and_both_prefix_types_coexist() -> None:
    class Precise:
        name = "prefix-precise"

        def score(self, state: CycleState, request: LLMRequest,
                  eps: Sequence[Endpoint]) -> list[float]:
            return [1.0] * len(eps)

    registry = register_builtin_plugins(PluginRegistry())
    registry.register("prefix-precise", "scorer", lambda ctx: Precise())
    profile = build_profile(registry, context(scorers=[{"type": "prefix-precise"},
                                                       {"type": "prefix-approx"}]), "t")
    assert [s.type_name for s in profile.scorers] == ["prefix-precise", "prefix-approx"]
    assert profile.degraded == {}


def test_precise_missing_with_approx_configured_is_dropped() -> None:
    registry = register_builtin_plugins(PluginRegistry())
    profile = build_profile(registry, context(scorers=[{"type": "prefix-precise"},
                                                       {"type": "prefix-approx"}]), "t")
    assert [s.type_name for s in profile.scorers] == ["prefix-approx"]


def test_scores_are_clamped_and_weighted() -> None:
    class Wild:
        name = "wild"

        def score(self, state: CycleState, request: LLMRequest,
                  eps: Sequence[Endpoint]) -> list[float]:
            return [5.0, -3.0, float("nan")]

    registry = register_builtin_plugins(PluginRegistry())
    registry.register("queue-depth", "scorer", lambda ctx: Wild())
    profile = build_profile(registry, context(scorers=[{"type": "queue-depth", "weight": 2}]),
                            "t")
    ranked = profile.run(CycleState(), LLMRequest(model="m"), endpoints(3), limit=3)
    assert ranked[0].endpoint.name == "e0" and ranked[0].total == 2.0
    assert sorted(r.total for r in ranked[1:]) == [0.0, 0.0]


def test_unknown_picker_is_an_error() -> None:
    registry = PluginRegistry()
    with pytest.raises(ProfileBuildError, match="picker"):
        build_profile(registry, context(), "t")


def test_max_score_breaks_ties_at_random() -> None:
    picker = MaxScorePicker(random.Random(1))
    eps = endpoints(4)
    firsts = Counter(
        picker.pick(CycleState(), LLMRequest(model="m"),
                    [ScoredEndpoint(e, 1.0) for e in eps[:3]] + [ScoredEndpoint(eps[3], 0.5)],
                    limit=4)[0].endpoint.name
        for _ in range(600))
    assert set(firsts) == {"e0", "e1", "e2"}
    assert min(firsts.values()) > 120


def test_weighted_random_follows_scores_and_returns_distinct_fallbacks() -> None:
    picker = WeightedRandomPicker(random.Random(2))
    eps = endpoints(2)
    counts: Counter[str] = Counter()
    for _ in range(2000):
        ranked = picker.pick(CycleState(), LLMRequest(model="m"),
                             [ScoredEndpoint(eps[0], 3.0), ScoredEndpoint(eps[1], 1.0)], 2)
        assert {r.endpoint.name for r in ranked} == {"e0", "e1"}
        counts[ranked[0].endpoint.name] += 1
    assert 0.65 < counts["e0"] / 2000 < 0.85
