"""The autoscaler's decision, as pure logic: from per-replica engine metrics to a desired
replica count within min/max, with stabilisation windows and a maximum step (the shape of the
Kubernetes HPA algorithm, applied to vLLM's queue depth and KV-cache usage).

Per metric, ``desired = ceil(current * observed_average / target)``, ignored within a 10 %
tolerance of the target; the higher of the two metrics wins. A raise must have been asked for
throughout the scale-up window (the lowest recommendation in the window is used) and a cut
throughout the scale-down window (the highest is used); then the step is capped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kvroute_api.inference_pool import AutoscalingSpec

TOLERANCE = 0.1


@dataclass(frozen=True)
class PoolLoad:
    """Per-pod samples of the pool's engines, as Prometheus reported them."""

    waiting_requests: dict[str, float]
    kv_cache_usage: dict[str, float]

    @property
    def reporting_pods(self) -> int:
        return len(set(self.waiting_requests) | set(self.kv_cache_usage))


@dataclass(frozen=True)
class ScaleDecision:
    """What the autoscaler wants and why (the why goes into an Event and the status)."""

    current: int
    desired: int
    raw: int
    reason: str
    message: str

    @property
    def changes(self) -> bool:
        return self.desired != self.current


def _metric_recommendation(current: int, values: dict[str, float],
                           target: float | None) -> tuple[int, float] | None:
    if target is None or not values:
        return None
    average = sum(values.values()) / len(values)
    ratio = average / target
    base = max(current, 1)
    if abs(ratio - 1.0) <= TOLERANCE:
        return base if current > 0 else 0, average
    return math.ceil(base * ratio), average


def raw_recommendation(current: int, load: PoolLoad,
                       spec: AutoscalingSpec) -> tuple[int, str]:
    """Replicas the metrics ask for right now (clamped to min/max), and the explanation."""
    parts: list[str] = []
    candidates: list[int] = []
    queue = _metric_recommendation(current, load.waiting_requests, spec.target_queue_depth)
    if queue is not None:
        candidates.append(queue[0])
        parts.append(f"queue depth {queue[1]:.2f}/replica vs target {spec.target_queue_depth:g}"
                     f" -> {queue[0]}")
    kv = _metric_recommendation(current, load.kv_cache_usage, spec.target_kv_cache_utilization)
    if kv is not None:
        candidates.append(kv[0])
        parts.append(f"KV-cache usage {kv[1]:.2f}/replica vs target "
                     f"{spec.target_kv_cache_utilization:g} -> {kv[0]}")
    wanted = max(candidates) if candidates else current
    clamped = min(max(wanted, spec.min_replicas), spec.max_replicas)
    if clamped != wanted:
        parts.append(f"clamped to {spec.min_replicas}..{spec.max_replicas}")
    return clamped, "; ".join(parts) or "no metrics"


@dataclass
class AutoscalerMemory:
    """Recent raw recommendations of one pool (kept in the operator's memory; a restart
    starts the stabilisation windows afresh, which only delays scaling)."""

    history: list[tuple[float, int]] = field(default_factory=list)
    last_evaluated: float | None = None
    # What the last evaluation reported (a condition and status fields, as the reconciler
    # writes them), repeated in every status write until the next evaluation.
    last_report: tuple[list[Any], dict[str, Any]] = field(default_factory=lambda: ([], {}))

    def due(self, now: float, spec: AutoscalingSpec) -> bool:
        return self.last_evaluated is None or now - self.last_evaluated >= spec.interval_seconds

    def decide(self, now: float, current: int, load: PoolLoad,
               spec: AutoscalingSpec) -> ScaleDecision:
        """Record this evaluation and return the stabilised, step-limited decision."""
        self.last_evaluated = now
        if load.reporting_pods == 0:
            clamped = min(max(current, spec.min_replicas), spec.max_replicas)
            return ScaleDecision(current, clamped, clamped, "NoMetrics",
                                 "no engine of the pool reports metrics; holding "
                                 f"{clamped} replicas")
        raw, why = raw_recommendation(current, load, spec)
        self.history.append((now, raw))
        horizon = max(spec.scale_up_stabilization_seconds, spec.scale_down_stabilization_seconds)
        self.history = [(t, r) for t, r in self.history if now - t <= horizon]
        up_window = [r for t, r in self.history if now - t <= spec.scale_up_stabilization_seconds]
        down_window = [r for t, r in self.history
                       if now - t <= spec.scale_down_stabilization_seconds]
        desired = current
        if raw > current:
            desired = max(current, min(up_window))
        elif raw < current:
            desired = min(current, max(down_window))
        if current < spec.min_replicas or current > spec.max_replicas:
            desired = min(max(current, spec.min_replicas), spec.max_replicas)
        step = desired - current
        if abs(step) > spec.max_step:
            desired = current + int(math.copysign(spec.max_step, step))
        if desired > current:
            reason = "ScaleUp"
        elif desired < current:
            reason = "ScaleDown"
        else:
            reason = "Stable" if raw == current else "Stabilizing"
        message = f"{current} -> {desired} replicas ({why})"
        if raw != desired:
            message += f"; metrics ask for {raw}"
            if desired == current:
                message += " but the stabilisation window holds the size"
            else:
                message += f", limited by maxStep {spec.max_step}"
        return ScaleDecision(current, desired, raw, reason, message)
