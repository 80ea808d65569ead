"""The router's own Prometheus metrics (``kvroute_*``), in a registry per router instance so
several routers (tests, benchmarks) can live in one process."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

DECISION_BUCKETS = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RATIO_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
PAUSE_BUCKETS = (2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)

M = TypeVar("M", Counter, Gauge, Histogram)


class Children(Generic[M]):
    """A labelled metric's children, remembered by their label values.

    prometheus_client's ``labels()`` checks the values and takes a lock on every call (~2.3 µs
    here); a routed request touches about ten series and a KV-event batch five or six, so the
    hot paths look their children up here instead (~0.2 µs). The router never removes a
    series, so a remembered child is always the one the registry exports. Values are ``str``:
    the key is the tuple as given.
    """

    __slots__ = ("_children", "metric")
    metric: M
    _children: dict[tuple[str, ...], M]

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self._children = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class RouterMetrics:
    """Every metric the router exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kvroute_requests", "Requests finished, by policy, pool, endpoint and HTTP status.",
            ["policy", "pool", "endpoint", "status"], registry=r)
        self.decision_latency = Histogram(
            "kvroute_decision_latency_seconds",
            "Time to choose an endpoint (resolve, admission, filters, scorers, picker).",
            ["entrypoint"], buckets=DECISION_BUCKETS, registry=r)
        self.prefix_match = Histogram(
            "kvroute_prefix_match_ratio",
            "Share of the prompt's blocks the chosen endpoint was known to hold.",
            ["policy", "pool"], buckets=RATIO_BUCKETS, registry=r)
        self.ttft = Histogram(
            "kvroute_ttft_seconds", "Time to first token as observed by the proxy (streams).",
            ["policy", "pool"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(
            "kvroute_e2e_latency_seconds", "End-to-end request latency as observed by the proxy.",
            ["policy", "pool"], buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_waits = Counter(
            "kvroute_prefill_waits",
            "Requests that waited for their endpoint to finish computing their prompt's prefix "
            "for an earlier request (scoring.prefillWaitMs), by how the wait ended: answered "
            "(the earlier request started answering or ended) or timeout.",
            ["pool", "outcome"], registry=r)
        self.prefill_wait = Histogram(
            "kvroute_prefill_wait_seconds",
            "How long those requests waited.", ["pool"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "kvroute_in_flight_requests", "Requests this router dispatched that have not finished.",
            ["pool", "endpoint"], registry=r)
        self.retries = Counter(
            "kvroute_retries", "Attempts retried on another endpoint before the first byte.",
            ["policy", "pool"], registry=r)
        self.per_try_extensions = Counter(
            "kvroute_per_try_extensions",
            "Per-try timeouts that found the endpoint answering other requests (busy, not "
            "stuck), so the attempt kept waiting instead of being retried elsewhere.",
            ["policy", "pool"], registry=r)
        self.shed = Counter(
            "kvroute_shed_requests", "Requests rejected by admission (429), by reason.",
            ["policy", "reason"], registry=r)
        self.routing_errors = Counter(
            "kvroute_routing_errors", "Requests that got no endpoint, by HTTP status.",
            ["status"], registry=r)
        self.degraded_scorers = Gauge(
            "kvroute_degraded_scorers",
            "Scorers a policy asked for that this router replaced (1) by a fallback.",
            ["policy", "scorer", "replacement"], registry=r)
        self.scrape_idle_endpoints = Gauge(
            "kvroute_scrape_idle_endpoints",
            "Endpoints scraped at the idle period now (--idle-scrape-interval-ms): their last "
            "pages showed nothing running or waiting for several scrapes in a row (kvroute router "
            "--help says how many) and nothing was sent to them since.", ["pool"], registry=r)
        self.scrape_foreign_load_endpoints = Gauge(
            "kvroute_scrape_foreign_load_endpoints",
            "Endpoints scraped at --scrape-interval-ms because a page in the last 30 accounted "
            "periods (30 s at the default) showed "
            "more requests running and waiting than this router sent them (another replica "
            "without replica sync, or with it, clients going to the engine directly); the "
            "others are scraped at --accounted-scrape-interval-ms.", ["pool"], registry=r)
        self.scrapes = Counter(
            "kvroute_scrapes",
            "Scrapes of engines' /metrics this router made, failed ones included: how often "
            "the adaptive period (--scrape-interval-ms, --accounted-scrape-interval-ms, "
            "--idle-scrape-interval-ms) had it ask.", ["pool"], registry=r)
        self.scrape_errors = Counter(
            "kvroute_scrape_errors",
            "Failed scrapes of an engine's /metrics, by reason (unreachable: connection error "
            "or timeout | http_status: not 200 | bad_page: a body the parser rejects, e.g. a "
            "non-numeric or non-finite value; the endpoint's metrics are then dropped until "
            "the next good scrape).", ["pool", "endpoint", "reason"], registry=r)

        self.loop_lag = Histogram(
            "kvroute_event_loop_lag_seconds",
            "How late a timer on the router's event loop ran (sampled every "
            "--loop-lag-probe-ms): what a request arriving then waited before the router could "
            "look at it. About 1 ms resolution on uvloop.",
            buckets=PAUSE_BUCKETS, registry=r)
        self.gc_pause = Histogram(
            "kvroute_gc_pause_seconds",
            "Cyclic garbage-collector passes in the router process and how long each stopped "
            "it, by generation (2: full collection).",
            ["generation"], buckets=PAUSE_BUCKETS, registry=r)

        # The process's RSS, open fds, CPU (the standard ``process_*`` names every Prometheus
        # client exports; Linux only, empty elsewhere).
        ProcessCollector(registry=r)


class RuntimeCollector:
    """Gauges a leak shows in first (read at scrape time, nothing kept between scrapes):
    ``kvroute_asyncio_tasks`` (tasks alive on the router's event loop) and
    ``kvroute_internal_entries{table}`` (entries of each in-memory table that grows with
    traffic: budget meters, tracked tenants, admission controllers, …; ``sizes`` returns them),
    and ``kvroute_prefill_backlog_tokens{pool,endpoint}`` (each endpoint's prefill backlog, what
    the ``prefill-cost`` scorer reads; 0 on an idle router, so anything else is a leak;
    ``backlogs`` returns (pool, endpoint, tokens)). The soak benchmark (``bench/soak.py``,
    docs/benchmarks/soak.md) watches the first two."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 sizes: Callable[[], Mapping[str, int]],
                 backlogs: Callable[[], Iterable[tuple[str, str, float]]] = tuple) -> None:
        self.loop = loop
        self.sizes = sizes
        self.backlogs = backlogs

    def collect(self) -> Iterator[Metric]:
        tasks = GaugeMetricFamily("kvroute_asyncio_tasks",
                                  "Tasks alive (not done) on the router's event loop.")
        tasks.add_metric([], float(len(asyncio.all_tasks(self.loop))))
        yield tasks
        tables = GaugeMetricFamily(
            "kvroute_internal_entries",
            "Entries of the router's in-memory tables that grow with traffic, by table "
            "(docs/reliability.md, 'Soak').", labels=["table"])
        for table, size in sorted(self.sizes().items()):
            tables.add_metric([table], float(size))
        yield tables
        backlog = GaugeMetricFamily(
            "kvroute_prefill_backlog_tokens",
            "Prompt tokens this router sent each endpoint that it has not started answering "
            "(estimated, without what the endpoint held): the prefill-cost scorer's load.",
            labels=["pool", "endpoint"])
        for pool, endpoint, tokens in self.backlogs():
            backlog.add_metric([pool, endpoint], tokens)
        yield backlog


class RuntimeProbes:
    """Where a request's time goes when the router is busy with something else: the event
    loop's lag (a timer re-armed every ``interval_s`` records how late it fired into
    ``kvroute_event_loop_lag_seconds``; 0 turns it off) and every garbage-collector pass
    (``kvroute_gc_pause_seconds``, from ``gc.callbacks``). Both cost a few microseconds per
    sample or pass."""

    def __init__(self, metrics: RouterMetrics, interval_s: float) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._gc_started: float | None = None
        self._gc_pause = [metrics.gc_pause.labels(str(g)) for g in range(3)]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.interval_s > 0 and self._timer is None:
            self._loop = loop
            self._arm()
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _arm(self) -> None:
        assert self._loop is not None
        # Measured on the monotonic clock, not loop.time(): uvloop's is in whole milliseconds.
        self._due = time.monotonic() + self.interval_s
        self._timer = self._loop.call_later(self.interval_s, self._tick)

    def _tick(self) -> None:
        self.metrics.loop_lag.observe(max(0.0, time.monotonic() - self._due))
        self._arm()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        """A collection starts or stops. Never raises: a pass can start anywhere, at the
        bottom of a deep stack too, and an exception here would be reported from inside the
        garbage collector (pytest fails the test that happened to be running). A pass whose
        start could not be recorded is not observed."""
        try:
            if phase == "start":
                self._gc_started = time.perf_counter()
            elif self._gc_started is not None:
                started, self._gc_started = self._gc_started, None
                self._gc_pause[info["generation"]].observe(time.perf_counter() - started)
        except RecursionError:
            self._gc_started = None
