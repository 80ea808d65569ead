"""Prometheus metrics of the KV-event pipeline (``kvroute_kv_*``).

One :class:`KVEventMetrics` per registry, like the router's own metrics, so several routers can
live in one process (tests, benchmarks). Pass the router's registry to share its ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from kvroute_router.kvevents.index import DISPATCH_STATES

MATCH_BLOCK_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class KVEventMetrics:
    """Every metric the subscribers, the index and the precise scorer export."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages_received = Counter(
            "kvroute_kv_events_messages_received", "KV-event batches received, by endpoint and "
            "path (live, replay).", ["endpoint", "path"], registry=r)
        self.events_decoded = Counter(
            "kvroute_kv_events_decoded", "KV events decoded, by endpoint and event type.",
            ["endpoint", "type"], registry=r)
        self.events_dropped = Counter(
            "kvroute_kv_events_dropped", "KV-event batches or events not applied, by endpoint "
            "and reason (queue_full, undecodable, unknown_type, duplicate, other_medium).",
            ["endpoint", "reason"], registry=r)
        self.duplicate_blocks = Counter(
            "kvroute_kv_events_duplicate_blocks", "BlockStored for a block the endpoint already "
            "held, or BlockRemoved for one it did not.", ["endpoint", "type"], registry=r)
        self.replays = Counter(
            "kvroute_kv_events_replays", "Replay requests to an engine, by outcome (ok, "
            "timeout, history_lost, unavailable, incomplete: an answer with a hole, asked "
            "again; hole: a batch in no answer, stepped over; tail_check: an idle engine "
            "asked what follows its last batch).", ["endpoint", "outcome"], registry=r)
        self.gaps = Counter(
            "kvroute_kv_events_gaps", "Sequence gaps detected (missed batches).", ["endpoint"],
            registry=r)
        self.restarts = Counter(
            "kvroute_kv_events_engine_restarts", "Engine restarts detected (sequence went back, "
            "replay disagreed), each dropping that endpoint's blocks.", ["endpoint"], registry=r)
        self.cleared = Counter(
            "kvroute_kv_events_index_clears", "Times an endpoint's blocks were dropped, by reason.",
            ["endpoint", "reason"], registry=r)
        self.reconnects = Counter(
            "kvroute_kv_events_reconnects", "Subscriber (re)connections, by endpoint.",
            ["endpoint"], registry=r)
        self.hash_checks = Counter(
            "kvroute_kv_events_hash_checks", "BlockStored hashes recomputed by the self-check, by "
            "result (match, mismatch, unverifiable).", ["endpoint", "result"], registry=r)
        self.hash_mismatches = Counter(
            "kvroute_kv_events_hash_mismatch", "BlockStored events whose hashes the router could "
            "not reproduce: the engine's block size, hash algorithm or seed differs from the "
            "router's configuration.", ["endpoint"], registry=r)
        self.index_blocks = Gauge(
            "kvroute_kv_index_blocks", "Blocks the prefix index holds, by endpoint.",
            ["endpoint"], registry=r)
        self.index_distinct_blocks = Gauge(
            "kvroute_kv_index_distinct_blocks", "Distinct block hashes in the prefix index.",
            registry=r)
        self.last_event_age = Gauge(
            "kvroute_kv_events_last_event_timestamp_seconds", "Unix time of the last batch "
            "applied, by endpoint.", ["endpoint"], registry=r)
        self.match_blocks = Histogram(
            "kvroute_kv_prefix_match_blocks", "Longest cached prefix (blocks) of the endpoint the "
            "precise scorer rated best, per request.", buckets=MATCH_BLOCK_BUCKETS, registry=r)
        self.scorer_source = Counter(
            "kvroute_kv_prefix_scorer_source", "Per endpoint scored: precise (fresh KV events) "
            "or approximate (events stale, missing or untrustworthy).", ["source"], registry=r)

        self._forecasts = _EndpointCounts(
            "kvroute_kv_index_forecast_blocks", "Blocks the prefix index forecast a dispatch "
            "would evict (doomed), of which the engine confirmed the eviction (confirmed) or "
            "did not in time, and they count again (restored); by endpoint "
            "(engine.kvEvents.evictionForecast).", "outcome", ("doomed", "confirmed", "restored"))
        r.register(self._forecasts)
        self._dispatches = _EndpointCounts(
            "kvroute_kv_dispatch_blocks", "Blocks of the prompts dispatched to each endpoint, by "
            "where each stood: published there (held), already being computed there "
            "(computing), held or being computed by another endpoint only (held_elsewhere: "
            "a spill, computed twice), evicted from the fleet recently (evicted: the KV cache is "
            "too small for the working set), or neither (new).", "state", DISPATCH_STATES)
        r.register(self._dispatches)

    def watch_forecasts(self, read: Callable[[], Mapping[str, Sequence[int]]]) -> None:
        """Export an index's eviction forecasts (``read``: per endpoint, blocks doomed,
        confirmed, restored) as ``kvroute_kv_index_forecast_blocks``."""
        self._forecasts.readers.append(read)

    def watch_dispatches(self, read: Callable[[], Mapping[str, Sequence[int]]]) -> None:
        """Export an index's dispatched blocks by state (``read``: per endpoint, counts in
        ``DISPATCH_STATES`` order) as ``kvroute_kv_dispatch_blocks``."""
        self._dispatches.readers.append(read)


class _EndpointCounts(Collector):
    """Reads per-endpoint counts from the indexes at scrape time (an index keeps plain
    integers on its hot paths) as one counter with an endpoint and a ``label`` label."""

    def __init__(self, name: str, documentation: str, label: str,
                 values: Sequence[str]) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.values = tuple(values)
        self.readers: list[Callable[[], Mapping[str, Sequence[int]]]] = []

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation,
                                     labels=["endpoint", self.label])
        for read in self.readers:
            for endpoint, counts in read().items():
                for value, count in zip(self.values, counts, strict=True):
                    family.add_metric([endpoint, value], count)
        yield family
