"""What the scheduler knows about one engine: its address and pool, the latest metrics snapshot
(with its age, for staleness) and the requests this router has in flight to it.

The datastore owns :class:`Endpoint` objects and mutates them (the scraper replaces
``metrics`` atomically, the director counts in-flight requests); plugins only read them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """One scrape of an engine's ``/metrics``, summed over its data-parallel ranks."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    block_size: int | None = None
    hash_algo: str | None = None
    num_gpu_blocks: int | None = None
    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    max_loras: int | None = None
    scraped_at: float = 0.0
    """``time.monotonic()`` when the scrape finished."""


@dataclass(eq=False, slots=True)
class Endpoint:
    """One engine of a pool, as the router sees it right now."""

    name: str
    address: str
    pool: str
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    metrics: EndpointMetrics | None = None
    in_flight: int = 0
    """Requests this router dispatched to the endpoint that have not finished."""
    dispatched_since_scrape: int = 0
    """Dispatches after the latest metrics snapshot (not yet visible in it)."""
    scrape_failures: int = 0
    """Consecutive failed scrapes (0 after a success)."""
    unavailable_until: float = 0.0
    """``time.monotonic()`` until which the proxy saw the endpoint refuse connections."""
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def metrics_age(self, now: float | None = None) -> float:
        """Seconds since the last successful scrape (infinite when never scraped)."""
        if self.metrics is None:
            return float("inf")
        return (time.monotonic() if now is None else now) - self.metrics.scraped_at

    def metrics_stale(self, stale_after_s: float, now: float | None = None) -> bool:
        return self.metrics_age(now) > stale_after_s

    def healthy(self, now: float | None = None, max_scrape_failures: int = 3) -> bool:
        """Not known to be down: fewer than ``max_scrape_failures`` failed scrapes in a row and
        no recent connection failure seen by the proxy. Never-scraped endpoints count as
        healthy, so a fresh router serves before its first scrape completes."""
        if self.scrape_failures >= max_scrape_failures:
            return False
        return (time.monotonic() if now is None else now) >= self.unavailable_until

    def running_estimate(self) -> float:
        """Running requests: the engine's number, or this router's own in-flight count when
        that is larger (fresh dispatches are not in the snapshot yet)."""
        scraped = self.metrics.running if self.metrics else 0.0
        return max(scraped, float(self.in_flight))

    def waiting_estimate(self) -> float:
        """Waiting requests, counting dispatches after the snapshot as waiting."""
        scraped = self.metrics.waiting if self.metrics else 0.0
        return scraped + float(self.dispatched_since_scrape)
