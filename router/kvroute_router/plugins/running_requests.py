"""``running-requests``: prefers endpoints running fewer requests (the engine's
``vllm:num_requests_running``, or this router's own in-flight count when larger, i.e.
:meth:`Endpoint.running_estimate`; a stale snapshot's number is replaced by the fresh
candidates' average)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import ClassVar

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint, LoadEstimates
from kvroute_router.framework.registry import PluginContext
from kvroute_router.framework.request import LLMRequest
from kvroute_router.plugins.load_values import less_is_better


class RunningRequestsScorer:
    TYPE: ClassVar[str] = "running-requests"

    def __init__(self, stale_after_s: float) -> None:
        self.name = self.TYPE
        self.stale_after_s = stale_after_s

    def score(self, state: CycleState, request: LLMRequest,
              endpoints: Sequence[Endpoint]) -> list[float]:
        loads = LoadEstimates.for_cycle(state, endpoints, self.stale_after_s, time.monotonic())
        return less_is_better(loads.running(stale_value=None))

    @classmethod
    def build(cls, context: PluginContext) -> RunningRequestsScorer:
        return cls(context.scoring.stale_metrics_ms / 1000.0)
