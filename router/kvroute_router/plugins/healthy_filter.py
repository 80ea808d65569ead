"""``healthy-filter``: drops endpoints known to be down (failed scrapes in a row, or a recent
connection failure seen by the proxy or the scraper). Endpoints never scraped yet pass.

**Panic rule.** When *every* pool of the policy (fallbacks included) had no healthy endpoint
and some endpoints failed only their scrapes, the director runs the cycle again with
``STATE_HEALTH_PANIC`` set, and this filter then keeps the endpoints that did not refuse a
connection (to the proxy or to the scraper), instead of none. A metrics page that times out is
weak evidence that an engine cannot serve — an API server busy with a burst of streams, a
CPU-starved node, a slow ``/metrics`` — and the case where it hits every endpoint at once is
the one where dropping them all turns a metrics hiccup into an outage: every request answered
503 while the engines serve. (Found by the soak benchmark: with the machine starved for CPU for
two minutes, every scrape of both engines timed out and the router answered 564 requests 503
while the engines still served the rest.) Envoy makes the same trade with its *panic
threshold*, after spilling to lower priorities. An endpoint that refused a connection stays out
(``unavailable_until``); a request sent to an engine that is really down fails over like any
other connection failure (the proxy's retry, its connect timeout). With any pool healthy
nothing changes: a stalled engine is still dropped while others serve, a fallback pool still
takes over. Each panic is logged (at most every 10 s). The rule itself is
:func:`kvroute_router.framework.endpoint.serving`, shared with admission's replica count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import ClassVar

from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import STATE_HEALTH_PANIC, Endpoint, serving
from kvroute_router.framework.registry import PluginContext
from kvroute_router.framework.request import LLMRequest

log = logging.getLogger(__name__)

PANIC_LOG_EVERY_S = 10.0


class HealthyFilter:
    TYPE: ClassVar[str] = "healthy-filter"

    def __init__(self, max_scrape_failures: int = 3) -> None:
        self.name = self.TYPE
        self.max_scrape_failures = max_scrape_failures
        self.panics = 0
        self._logged_at = float("-inf")

    def filter(self, state: CycleState, request: LLMRequest,
               endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        now = time.monotonic()
        panic = state.read(STATE_HEALTH_PANIC, bool) is True
        kept = serving(endpoints, now, self.max_scrape_failures, panic)
        if panic and kept and all(ep.scrape_failures >= self.max_scrape_failures
                                  for ep in kept):
            self.panics += 1
            if now - self._logged_at >= PANIC_LOG_EVERY_S:
                self._logged_at = now
                log.warning("every endpoint of %s failed its last %d scrapes; routing among "
                            "the %d that did not refuse a connection (panic, %d so far)",
                            endpoints[0].pool, self.max_scrape_failures, len(kept),
                            self.panics)
        return kept

    @classmethod
    def build(cls, context: PluginContext) -> HealthyFilter:
        return cls()
