"""``healthy-filter``: drops endpoints known to be down (failed scrapes in a row, or a recent
connection failure seen by the proxy). Endpoints never scraped yet pass."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import ClassVar

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.registry import PluginContext
from kvroute_router.framework.request import LLMRequest


class HealthyFilter:
    TYPE: ClassVar[str] = "healthy-filter"

    def __init__(self, max_scrape_failures: int = 3) -> None:
        self.name = self.TYPE
        self.max_scrape_failures = max_scrape_failures

    def filter(self, state: CycleState, request: LLMRequest,
               endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        now = time.monotonic()
        limit = self.max_scrape_failures
        # Endpoint.healthy, inlined: this runs over every endpoint of the pool per request.
        return [ep for ep in endpoints
                if ep.scrape_failures < limit and now >= ep.unavailable_until]

    @classmethod
    def build(cls, context: PluginContext) -> HealthyFilter:
        return cls()
