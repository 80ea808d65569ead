"""``kv-utilization``: prefers endpoints with free KV cache; the score is
``1 - vllm:kv_cache_usage_perc`` (already 0-1), the candidates' average when stale."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import ClassVar

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint, LoadEstimates
from kvroute_router.framework.registry import PluginContext
from kvroute_router.framework.request import LLMRequest


class KVUtilizationScorer:
    TYPE: ClassVar[str] = "kv-utilization"

    def __init__(self, stale_after_s: float) -> None:
        self.name = self.TYPE
        self.stale_after_s = stale_after_s

    def score(self, state: CycleState, request: LLMRequest,
              endpoints: Sequence[Endpoint]) -> list[float]:
        loads = LoadEstimates.for_cycle(state, endpoints, self.stale_after_s, time.monotonic())
        scores: list[float] = (1.0 - loads.kv_usage(stale_value=None)).tolist()
        return scores

    @classmethod
    def build(cls, context: PluginContext) -> KVUtilizationScorer:
        return cls(context.scoring.stale_metrics_ms / 1000.0)
