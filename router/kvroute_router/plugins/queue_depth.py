"""``queue-depth``: prefers endpoints with fewer waiting requests (the engine's
``vllm:num_requests_waiting`` plus this router's dispatches since that scrape, i.e.
:meth:`Endpoint.waiting_estimate`; a stale snapshot's number is replaced by the fresh
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


class QueueDepthScorer:
    TYPE: ClassVar[str] = "queue-depth"

    def __init__(self, stale_after_s: float) -> None:
        self.name = self.TYPE
        self.stale_after_s = stale_after_s

    def score(self, state: CycleState, request: LLMRequest,
              endpoints: Sequence[Endpoint]) -> list[float]:
        loads = LoadEstimates.for_cycle(state, endpoints, self.stale_after_s, time.monotonic())
        return less_is_better(loads.waiting(stale_value=None))

    @classmethod
    def build(cls, context: PluginContext) -> QueueDepthScorer:
        return cls(context.scoring.stale_metrics_ms / 1000.0)
