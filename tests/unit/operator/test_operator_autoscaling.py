"""The autoscaler's pure decision: targets, tolerance, min/max, stabilisation windows, step."""

from __future__ import annotations

from kvroute_api.inference_pool import AutoscalingSpec
from kvroute_operator.autoscaling import AutoscalerMemory, PoolLoad, raw_recommendation


def spec(**overrides: object) -> AutoscalingSpec:
    base: dict[str, object] = {"minReplicas": 1, "maxReplicas": 10, "targetQueueDepth": 4,
                               "scaleUpStabilizationSeconds": 0,
                               "scaleDownStabilizationSeconds": 0, "maxStep": 10}
    base.update(overrides)
    return AutoscalingSpec.model_validate(base)


def load(waiting: list[float], kv: list[float] | None = None) -> PoolLoad:
    return PoolLoad(waiting_requests={f"p{i}": v for i, v in enumerate(waiting)},
                    kv_cache_usage={f"p{i}": v for i, v in enumerate(kv or [])})


def test_queue_depth_scales_proportionally() -> None:
    assert raw_recommendation(2, load([8, 8]), spec())[0] == 4
    assert raw_recommendation(4, load([1, 1, 1, 1]), spec())[0] == 1


def test_within_tolerance_holds() -> None:
    assert raw_recommendation(3, load([4.2, 4.1, 3.9]), spec())[0] == 3


def test_higher_metric_wins_and_bounds_apply() -> None:
    s = spec(targetKVCacheUtilization=0.5)
    assert raw_recommendation(2, load([0, 0], [0.9, 1.0]), s)[0] == 4
    count, why = raw_recommendation(2, load([100, 100]), spec(maxReplicas=5))
    assert count == 5 and "clamped" in why


def test_max_step_limits_a_jump() -> None:
    decision = AutoscalerMemory().decide(0, 2, load([40, 40]), spec(maxStep=2))
    assert (decision.raw, decision.desired, decision.reason) == (10, 4, "ScaleUp")


def test_scale_down_waits_for_its_window() -> None:
    memory = AutoscalerMemory()
    s = spec(scaleDownStabilizationSeconds=300)
    assert memory.decide(0, 4, load([4, 4, 4, 4]), s).desired == 4
    held = memory.decide(100, 4, load([0, 0, 0, 0]), s)
    assert held.desired == 4 and held.reason == "Stabilizing"
    assert memory.decide(401, 4, load([0, 0, 0, 0]), s).desired == 1


def test_scale_up_must_hold_for_its_window() -> None:
    memory = AutoscalerMemory()
    s = spec(scaleUpStabilizationSeconds=60)
    assert memory.decide(0, 2, load([4, 4]), s).desired == 2
    assert memory.decide(30, 2, load([8, 8]), s).desired == 2  # the window still has a 2
    assert memory.decide(91, 2, load([8, 8]), s).desired == 4


def test_no_metrics_holds_the_size() -> None:
    decision = AutoscalerMemory().decide(0, 3, load([]), spec())
    assert decision.desired == 3 and decision.reason == "NoMetrics"


def test_interval_gates_evaluation() -> None:
    memory = AutoscalerMemory()
    s = spec(intervalSeconds=30)
    assert memory.due(0, s)
    memory.decide(0, 2, load([4, 4]), s)
    assert not memory.due(10, s) and memory.due(30, s)
