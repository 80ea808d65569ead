"""``subset-filter``: keeps only the endpoints a gateway allowed (the GIE subset hint,
``envoy.lb.subset_hint``), when the request carries such a list."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.registry import PluginContext
from kvroute_router.framework.request import LLMRequest


class SubsetFilter:
    TYPE: ClassVar[str] = "subset-filter"

    def __init__(self) -> None:
        self.name = self.TYPE

    def filter(self, state: CycleState, request: LLMRequest,
               endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        allowed = request.allowed_addresses
        if allowed is None:
            return list(endpoints)
        return [ep for ep in endpoints if ep.address in allowed]

    @classmethod
    def build(cls, context: PluginContext) -> SubsetFilter:
        return cls()
