"""Shared arithmetic of the load scorers: stale metrics replaced by the candidates' average,
and min-max normalisation into [0, 1] where less load scores higher.

The load numbers themselves come from :class:`~kvroute_router.framework.endpoint.Endpoint`'s
staleness-aware estimates (``waiting_estimate``, ``running_estimate``, ``kv_usage_estimate``),
the one definition the ``load-headroom`` filter uses too."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from kvroute_router.framework.endpoint import Endpoint, EndpointMetrics


def fresh_average(endpoints: Sequence[Endpoint], stale_after_s: float, now: float,
                  value: Callable[[EndpointMetrics], float]) -> float:
    """Average of ``value`` over the endpoints whose metrics are fresh (0 when none is)."""
    total = 0.0
    count = 0
    for ep in endpoints:
        m = ep.metrics
        if m is not None and now - m.scraped_at <= stale_after_s:
            total += value(m)
            count += 1
    return total / count if count else 0.0


def less_is_better(values: Sequence[float] | npt.NDArray[np.float64]) -> list[float]:
    """1 for the smallest value, 0 for the largest, linear between; all 1 when equal."""
    if len(values) == 0:
        return []
    column = np.asarray(values, dtype=np.float64)
    low = float(column.min())
    high = float(column.max())
    span = high - low
    if span <= 0:
        return [1.0] * len(column)
    scores: list[float] = ((high - column) / span).tolist()
    return scores
