"""The load scorers: each prefers endpoints with less of one load number, from
:class:`~kvroute_router.framework.endpoint.LoadEstimates` (the staleness-aware estimates the
``load-headroom`` filter uses too; a stale snapshot's number is replaced by the fresh
candidates' average).

* ``queue-depth`` — fewer waiting requests: the engine's ``vllm:num_requests_waiting`` plus this
  router's dispatches since that scrape that have not answered (:meth:`Endpoint.waiting_estimate`).
* ``running-requests`` — fewer running requests: the engine's ``vllm:num_requests_running``, or
  this router's own in-flight count when larger (:meth:`Endpoint.running_estimate`).
* ``kv-utilization`` — more free KV cache: ``1 - vllm:kv_cache_usage_perc`` (already 0-1).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import ClassVar, Self

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint, LoadEstimates
from kvroute_router.framework.registry import PluginContext
from kvroute_router.framework.request import LLMRequest
from kvroute_router.plugins.load_values import less_is_better


class LoadScorer:
    """One load number per candidate, scored in [0, 1] where less load scores higher."""

    TYPE: ClassVar[str]

    def __init__(self, stale_after_s: float) -> None:
        self.name = self.TYPE
        self.stale_after_s = stale_after_s

    def score(self, state: CycleState, request: LLMRequest,
              endpoints: Sequence[Endpoint]) -> list[float]:
        loads = LoadEstimates.for_cycle(state, endpoints, self.stale_after_s, time.monotonic())
        return self.scores(loads)

    def scores(self, loads: LoadEstimates) -> list[float]:
        raise NotImplementedError

    @classmethod
    def build(cls, context: PluginContext) -> Self:
        return cls(context.scoring.stale_metrics_ms / 1000.0)


class QueueDepthScorer(LoadScorer):
    TYPE: ClassVar[str] = "queue-depth"

    def scores(self, loads: LoadEstimates) -> list[float]:
        return less_is_better(loads.waiting(stale_value=None))


class RunningRequestsScorer(LoadScorer):
    TYPE: ClassVar[str] = "running-requests"

    def scores(self, loads: LoadEstimates) -> list[float]:
        return less_is_better(loads.running(stale_value=None))


class KVUtilizationScorer(LoadScorer):
    TYPE: ClassVar[str] = "kv-utilization"

    def scores(self, loads: LoadEstimates) -> list[float]:
        free: list[float] = (1.0 - loads.kv_usage(stale_value=None)).tolist()
        return free
