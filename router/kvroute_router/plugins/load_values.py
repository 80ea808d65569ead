"""Shared arithmetic of the load scorers: stale metrics replaced by the candidates' average,
and min-max normalisation into [0, 1] where less load scores higher."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvroute_router.framework.endpoint import Endpoint, EndpointMetrics


def fresh_or_average(endpoints: Sequence[Endpoint], stale_after_s: float, now: float,
                     value: Callable[[EndpointMetrics], float]) -> list[float]:
    """``value`` of each endpoint's metrics; endpoints with stale or no metrics get the average
    of the fresh ones (0 when none is fresh), so old numbers neither attract nor repel."""
    fresh: list[float | None] = []
    total = 0.0
    count = 0
    for ep in endpoints:
        m = ep.metrics
        if m is None or now - m.scraped_at > stale_after_s:
            fresh.append(None)
        else:
            v = value(m)
            fresh.append(v)
            total += v
            count += 1
    average = total / count if count else 0.0
    return [average if v is None else v for v in fresh]


def less_is_better(values: Sequence[float]) -> list[float]:
    """1 for the smallest value, 0 for the largest, linear between; all 1 when equal."""
    if not values:
        return []
    low = min(values)
    high = max(values)
    span = high - low
    if span <= 0:
        return [1.0] * len(values)
    return [(high - v) / span for v in values]
