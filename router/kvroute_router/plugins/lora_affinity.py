"""``lora-affinity``: for requests naming a LoRA adapter, prefers endpoints that already run
or queue it (``vllm:lora_requests_info``), then endpoints with a free adapter slot. Requests
for the base model score 1 everywhere (neutral)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.registry import PluginContext
from kvroute_router.framework.request import LLMRequest


class LoraAffinityScorer:
    TYPE: ClassVar[str] = "lora-affinity"

    def __init__(self) -> None:
        self.name = self.TYPE

    def score(self, state: CycleState, request: LLMRequest,
              endpoints: Sequence[Endpoint]) -> list[float]:
        adapter = request.lora_adapter
        if not adapter:
            return [1.0] * len(endpoints)
        scores = []
        for ep in endpoints:
            m = ep.metrics
            if m is None:
                scores.append(0.5)
            elif adapter in m.running_loras or adapter in m.waiting_loras:
                scores.append(1.0)
            elif m.max_loras is None or len(m.running_loras | m.waiting_loras) < m.max_loras:
                scores.append(0.5)
            else:
                scores.append(0.0)
        return scores

    @classmethod
    def build(cls, context: PluginContext) -> LoraAffinityScorer:
        return cls()
