"""``load-headroom``: the filter that makes prefix affinity load-aware.

Prefix scorers give up to their full weight to an endpoint holding the prompt, and load
scorers normalised over the candidates can never outvote that: a hot tenant's traffic all lands
on the endpoint that first served it, and its queue grows without bound. This filter runs
before the scorers in every profile and keeps only the endpoints with **headroom**:

* a waiting queue (the engine's ``vllm:num_requests_waiting`` plus this router's dispatches
  since that scrape) below ``max_waiting`` (``RoutePolicy.spec.admission.saturationQueueDepth``),
* and KV-cache utilisation below ``max_kv_utilization`` (the admission gate's 0.95).

So prefix affinity decides only among endpoints that can start the request soon; a saturated
endpoint stops attracting its hot prefix, the overflow goes elsewhere, and the prefix scorer
learns the new holders (hot prefixes replicate onto as many endpoints as their load needs).

When no endpoint has headroom, the filter keeps the least-queued endpoints (every endpoint
whose waiting queue equals the smallest one), never an empty list: routing continues and
admission control (which sees the same saturation) decides about queueing or shedding.

Endpoints whose metrics are stale or missing are judged by the router's own dispatch count
only (an old number neither saturates nor clears an endpoint).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import ClassVar

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.registry import PluginContext
from kvroute_router.framework.request import LLMRequest

DEFAULT_MAX_WAITING = 8
"""``AdmissionSpec.saturationQueueDepth``'s default, used when the context carries none."""
DEFAULT_MAX_KV_UTILIZATION = 0.95
"""The admission gate's KV saturation level."""

STATE_SATURATED = "load-headroom/saturated"
"""CycleState key: names of the candidates this filter removed (list[str]); empty when it kept
all, or when none had headroom (it then keeps the least-queued ones)."""


class LoadHeadroomFilter:
    TYPE: ClassVar[str] = "load-headroom"
    SOFT: ClassVar[bool] = True
    """Endpoints it removes stay last-resort retry targets (the profile ranks them after every
    endpoint with headroom), so a failing pod with headroom is still retried elsewhere."""

    def __init__(self, max_waiting: float = DEFAULT_MAX_WAITING,
                 max_kv_utilization: float = DEFAULT_MAX_KV_UTILIZATION,
                 stale_after_s: float = 1.0) -> None:
        self.name = self.TYPE
        self.max_waiting = max_waiting
        self.max_kv_utilization = max_kv_utilization
        self.stale_after_s = stale_after_s

    def load_of(self, endpoint: Endpoint, now: float) -> tuple[float, float]:
        """(waiting estimate, KV utilisation) of ``endpoint``; stale metrics count as 0."""
        m = endpoint.metrics
        queued = float(endpoint.dispatched_since_scrape)
        if m is None or now - m.scraped_at > self.stale_after_s:
            return queued, 0.0
        return m.waiting + queued, m.kv_cache_usage

    def filter(self, state: CycleState, request: LLMRequest,
               endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        if len(endpoints) <= 1:
            return list(endpoints)
        now = time.monotonic()
        loads = [self.load_of(ep, now) for ep in endpoints]
        kept = [ep for ep, (waiting, kv) in zip(endpoints, loads, strict=True)
                if waiting < self.max_waiting and kv < self.max_kv_utilization]
        if not kept:
            least = min(waiting for waiting, _ in loads)
            state.write(STATE_SATURATED, [])
            return [ep for ep, (waiting, _) in zip(endpoints, loads, strict=True)
                    if waiting <= least]
        if len(kept) < len(endpoints):
            names = {ep.name for ep in kept}
            state.write(STATE_SATURATED, [ep.name for ep in endpoints if ep.name not in names])
        return kept

    @classmethod
    def build(cls, context: PluginContext) -> LoadHeadroomFilter:
        admission = context.admission
        max_waiting = (admission.saturation_queue_depth if admission is not None
                       else DEFAULT_MAX_WAITING)
        return cls(max_waiting=max_waiting,
                   stale_after_s=context.scoring.stale_metrics_ms / 1000.0)
