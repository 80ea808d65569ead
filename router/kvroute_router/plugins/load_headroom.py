"""``load-headroom``: the filter that makes prefix affinity load-aware.

Prefix scorers give up to their full weight to an endpoint holding the prompt, and load
scorers normalised over the candidates can never outvote that: a hot tenant's traffic all lands
on the endpoint that first served it, and its queue grows without bound. This filter runs
before the scorers in every profile and keeps only the endpoints with **headroom**:

* a waiting queue (the engine's ``vllm:num_requests_waiting`` plus this router's dispatches
  since that scrape that have not answered) less than ``max_waiting`` (``RoutePolicy.spec.admission.
  saturationQueueDepth``) *deeper than the median candidate's* (the lower median:
  :func:`reference_queue`),
* and KV-cache utilisation below ``max_kv_utilization`` (``saturationKvUtilization``, default
  1: only a full cache).

The queue rule is **relative** to the typical candidate: it removes hot spots, not busy
engines. When one holder's queue runs ahead of the fleet (a hot tenant), it loses headroom, the
overflow goes elsewhere, and the prefix scorer learns the new holders (hot prefixes replicate
onto as many endpoints as their load needs). When *every* engine is queueing (a fleet-wide
overload), none runs ahead of the others and prefix affinity keeps deciding: moving a tenant
off its holder then only recomputes its context elsewhere and evicts another tenant's, which
makes the overload worse. (Measured: with the absolute rule — an engine with 8 waiting requests
lost headroom whatever the others had — and the 0.95 KV rule, a long overload on 16 emulated
H100 engines kept only 67 % of the oracle's cache hits; docs/benchmarks/emulated-fleet.md,
round 4.) Admission control keeps the absolute thresholds of
:class:`~kvroute_router.framework.saturation.Saturation` (queue or shed when every endpoint is
saturated).

When no endpoint has headroom (only the KV rule can do that now), the filter keeps the
least-queued endpoints (every endpoint whose waiting queue equals the smallest one), never an
empty list: routing continues and admission control decides about queueing or shedding.

Endpoints whose metrics are stale or missing are judged by the router's own dispatch count
only (an old number neither saturates nor clears an endpoint). The numbers are
:meth:`Endpoint.waiting_estimate` and :meth:`Endpoint.kv_usage_estimate` with a stale value of
0, the same estimates the load scorers use.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint, LoadEstimates
from kvroute_router.framework.registry import PluginContext
from kvroute_router.framework.request import LLMRequest
from kvroute_router.framework.saturation import DEFAULT_QUEUE_DEPTH, KV_SATURATION, Saturation

DEFAULT_MAX_WAITING = DEFAULT_QUEUE_DEPTH
"""``AdmissionSpec.saturationQueueDepth``'s default, used when the context carries none."""
DEFAULT_MAX_KV_UTILIZATION = KV_SATURATION
"""The admission gate's KV saturation level."""

STATE_SATURATED = "load-headroom/saturated"
"""CycleState key: names of the candidates this filter removed (list[str]); empty when it kept
all, or when none had headroom (it then keeps the least-queued ones)."""


def reference_queue(waiting: npt.NDArray[np.float64]) -> float:
    """The waiting queue the rule measures headroom from: the lower median of the N
    candidates' (the ⌈N/2⌉-th smallest; the smaller of two).

    A hot spot is an engine whose queue runs ahead of the *typical* engine's. Measured from the
    least-queued candidate instead (the rule until round 11 of
    docs/benchmarks/emulated-fleet.md), the ordinary spread of a busy fleet's queues looked
    like hot spots: past saturation on 16 emulated H100 engines, two decisions in three removed
    at least one endpoint (a median of 2 and up to 9 of the 16), prefix holders among them,
    and their tenants' requests were recomputed elsewhere, evicting other tenants' contexts
    (the fleet simulator: 5-8 % of all prompt tokens spilled). The least-queued of N is also
    an extreme order statistic that falls as N grows, so the rule meant something else at 64
    engines than at 16 (round 10); the median means the same at every fleet size. A hot spot —
    one or a few engines far deeper than the rest — still loses headroom, since the median is
    one of the rest. An engine that is merely less busy than the rest (a new pod, one that
    drained) no longer takes every busier holder's headroom away; ``prefill-cost`` weighs the
    holder's backlog against recomputing the prompt there."""
    rank = (len(waiting) + 1) // 2 - 1
    if rank <= 0:
        return float(waiting.min())
    return float(np.partition(waiting, rank)[rank])


class LoadHeadroomFilter:
    TYPE: ClassVar[str] = "load-headroom"
    SOFT: ClassVar[bool] = True
    """Endpoints it removes stay last-resort retry targets (the profile ranks them after every
    endpoint with headroom), so a failing pod with headroom is still retried elsewhere."""

    def __init__(self, max_waiting: float = DEFAULT_MAX_WAITING,
                 max_kv_utilization: float = DEFAULT_MAX_KV_UTILIZATION,
                 stale_after_s: float = 1.0) -> None:
        self.name = self.TYPE
        self.saturation = Saturation(queue_depth=max_waiting, kv_utilization=max_kv_utilization)
        self.stale_after_s = stale_after_s

    @property
    def max_waiting(self) -> float:
        return self.saturation.queue_depth

    @property
    def max_kv_utilization(self) -> float:
        return self.saturation.kv_utilization

    def filter(self, state: CycleState, request: LLMRequest,
               endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        if len(endpoints) <= 1:
            return list(endpoints)
        loads = LoadEstimates.for_cycle(state, endpoints, self.stale_after_s, time.monotonic())
        waiting = loads.waiting()
        keep = self.saturation.headroom(waiting - reference_queue(waiting), loads.kv_usage())
        if not keep.any():
            least = waiting.min()
            state.write(STATE_SATURATED, [])
            keep = waiting <= least
            kept = [ep for ep, k in zip(endpoints, keep.tolist(), strict=True) if k]
            loads.subset(keep, kept, state)
            return kept
        if keep.all():
            kept = list(endpoints)
            loads.subset(keep, kept, state)
            return kept
        flags = keep.tolist()
        kept = [ep for ep, k in zip(endpoints, flags, strict=True) if k]
        state.write(STATE_SATURATED,
                    [ep.name for ep, k in zip(endpoints, flags, strict=True) if not k])
        loads.subset(keep, kept, state)
        return kept

    @classmethod
    def build(cls, context: PluginContext) -> LoadHeadroomFilter:
        saturation = Saturation.of(context.admission)
        return cls(max_waiting=saturation.queue_depth,
                   max_kv_utilization=saturation.kv_utilization,
                   stale_after_s=context.scoring.stale_metrics_ms / 1000.0)
