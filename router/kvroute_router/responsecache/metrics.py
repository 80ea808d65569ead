"""``kvroute_response_cache_*`` Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ResponseCacheMetrics:
    """The response cache's series, in the router's registry. ``cache_tier`` is the tier's
    ``namespace/name`` (the operator reads entries and hit rate by it for CacheTier status)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookups = Counter(
            "kvroute_response_cache_lookups_total",
            "Response-cache lookups by result: exact, semantic (hits), miss, skipped "
            "(not cacheable, e.g. sampling), error (backend or model failure; served as miss).",
            ["policy", "cache_tier", "result"], registry=registry)
        self.hits = Counter(
            "kvroute_response_cache_hits_total",
            "Requests answered from the response cache, per tenant: no engine, no budget "
            "charge (budget meters do not count them).", ["policy", "tenant", "match"],
            registry=registry)
        self.hit_tokens = Counter(
            "kvroute_response_cache_hit_tokens_total",
            "Tokens of answers served from the cache (the original usage), per tenant; "
            "not charged to budgets.", ["policy", "tenant", "kind"], registry=registry)
        self.writes = Counter(
            "kvroute_response_cache_writes_total",
            "Answers offered to the cache: stored, or rejected (error status, cut or "
            "unparsable stream, too large).", ["cache_tier", "result"], registry=registry)
        self.evictions = Counter(
            "kvroute_response_cache_evictions_total",
            "Entries evicted to stay within maxEntries.", ["cache_tier"], registry=registry)
        self.entries = Gauge(
            "kvroute_response_cache_entries",
            "Entries in the tier (memory: this replica; redis: shared, expired ones "
            "included until evicted).", ["cache_tier", "backend"], registry=registry)
        self.lookup_seconds = Histogram(
            "kvroute_response_cache_lookup_seconds",
            "Backend time of a lookup (exact, then semantic search), embedding excluded.",
            ["backend"], registry=registry,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 1.0))
        self.embedding_seconds = Histogram(
            "kvroute_response_cache_embedding_seconds",
            "Time to embed a query text (MiniLM, NumPy, off the event loop).",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))


__all__ = ["ResponseCacheMetrics"]
