"""Assembles a running router: datastore and its source (config file or Kubernetes), metrics
scraper, plugin registry, director, and the servers — OpenAI proxy (8080), Envoy ext_proc
(9002), native gRPC (9003), Prometheus (9090). Ports set to 0 pick free ones (tests);
``None`` disables a server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvroute_router.admission.hook import BudgetHook
from kvroute_router.admission.tenancy import TenantDirectory
from kvroute_router.budget.ledger import BudgetLedger
from kvroute_router.budget.meters import MeterStore
from kvroute_router.budget.metrics import BudgetMetrics
from kvroute_router.datastore.file_source import ConfigFileSource
from kvroute_router.datastore.kube_source import KubernetesSource
from kvroute_router.datastore.store import Datastore
from kvroute_router.director import Director
from kvroute_router.framework.registry import PluginRegistry, SharedServices
from kvroute_router.framework.tasks import cancel_and_wait
from kvroute_router.grpcauth import CallerTokens
from kvroute_router.kvevents.feed import (
    KVEventFeeds,
    KVEventMetricsCollector,
    register_precise_prefix,
)
from kvroute_router.plugins import register_builtin_plugins
from kvroute_router.plugins.prefix_approx import history_entries
from kvroute_router.plugins.prefix_precise import PrecisePrefixScorer
from kvroute_router.proxy.server import HTTP_PROTOCOL_LOG, OpenAIProxy
from kvroute_router.replicasync.sync import ReplicaSync
from kvroute_router.responsecache import ResponseCache
from kvroute_router.responsecache.metrics import ResponseCacheMetrics
from kvroute_router.router_metrics import RouterMetrics, RuntimeCollector, RuntimeProbes

log = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_GRACE_S = 50.0
"""The chart's router ``terminationGracePeriodSeconds`` (60) minus a 10 s margin."""

STARTUP_SETTLE_S = 30.0
"""How long the start-up heap freeze waits for the first listing and KV-event sync before it
freezes what is there."""

EVENT_LOOPS = ("uvloop", "asyncio")
"""The event loops the router runs on (``kvroute router --event-loop``). ``uvloop`` (libuv,
in C) is the default: on the proxy path it took ~15 % less router CPU per streamed request
than the standard library's loop (docs/benchmarks/router-cpu.md, round 3); ``asyncio`` is the
fallback where uvloop cannot run."""


@dataclass
class RouterSettings:
    """Where the router listens and where its configuration comes from."""

    config_paths: list[Path] = field(default_factory=list)
    kubernetes: bool = False
    namespace: str | None = None
    host: str = "0.0.0.0"
    http_port: int | None = 8080
    ext_proc_port: int | None = 9002
    grpc_port: int | None = 9003
    metrics_port: int | None = 9090
    scrape_interval_s: float = 0.1
    accounted_scrape_interval_s: float | None = None
    """How often an engine whose pages show only this router's requests is scraped; None: 1 s
    (:func:`~kvroute_router.scrape.scraper.scrape_periods`)."""
    idle_scrape_interval_s: float | None = None
    """How often an idle engine (nothing running, waiting or in flight for
    :data:`~kvroute_router.scrape.scraper.IDLE_AFTER_PAGES` scrapes in a row) is scraped; None:
    2x the accounted period (:func:`~kvroute_router.scrape.scraper.scrape_periods`)."""
    config_poll_interval_s: float = 1.0
    freeze_startup_heap: bool = False
    """Once started (configuration loaded, tokenizers and subscribers built), collect and
    ``gc.freeze()`` what start-up allocated, so the cyclic collector's full passes under
    traffic scan only what traffic created (``kvroute router`` turns it on; it is
    process-wide, so a router embedded in another program leaves it to that program)."""
    loop_lag_probe_s: float = 0.05
    """How often the event-loop lag probe samples (``kvroute_event_loop_lag_seconds``); 0:
    not at all."""
    kv_events: bool = True
    """Follow engines' KV events for the ``prefix-precise`` scorer."""
    tokenizer_dirs: dict[str, Path] = field(default_factory=dict)
    """Tokenizer folder per served model name (exact prompt hashing for prefix-precise)."""
    budgets: bool = True
    """Enforce RoutePolicy budgets, admission control and batch routing (``BudgetHook``)."""
    trust_tenant_header: bool = False
    """The proxy sits behind a gateway that sets the tenant header: believe it. Otherwise the
    proxy drops tenant and other trust-gated headers from clients not in
    ``trusted_proxy_cidrs``."""
    trusted_proxy_cidrs: list[str] = field(default_factory=list)
    """Proxy clients in these networks are a trusted hop: their trust-gated headers (tenant,
    priority, namespace scope, policy match headers) are believed (docs/security.md)."""
    ext_proc_trust_gateway_headers: bool = False
    """ext_proc believes trust-gated headers: its gateway strips clients' copies."""
    grpc_tokens_dir: Path | None = None
    """Mounted Secret of caller tokens: Pick/Report need one; the caller is the tenant."""
    ext_proc_require_token: bool = False
    """With ``grpc_tokens_dir``: ext_proc calls need a caller token too."""
    quality_data: Path | None = None
    """Labelled CSV (RouteLLM format) for the kNN quality estimator; else the heuristic."""
    quality_embedding: str = "auto"
    """The kNN's embedding: auto (MiniLM when its package is installed, built in the
    background behind the hashed one), minilm, or hashed (TF-IDF, no model)."""
    budget_redis_url: str | None = None
    """Shared budget meters in Redis (all replicas, survives restarts); else in memory."""
    replica_sync_redis_url: str | None = None
    """Replica coordination: publish this replica's dispatches (pending KV blocks, dispatch
    counts) to the other replicas over this Redis and apply theirs (docs/replica-sync.md);
    None: replicas route independently."""
    budget_replica_share: float = 1.0
    """Without Redis: this replica's share of every limit (1 / router replicas); replaced by
    the live count when ``budget_peer_service`` is set."""
    budget_peer_service: str | None = None
    """Without Redis: the router's own Service; every limit is shared by its ready endpoints
    (``1 / ready replicas``, followed live; docs/security.md)."""
    budget_peer_namespace: str | None = None
    """Namespace of ``budget_peer_service`` (default: ``namespace``, else ``default``)."""
    pod_name: str | None = None
    """This router's pod name (counted as a replica while it is not ready yet)."""
    api_keys: dict[str, dict[str, str]] = field(default_factory=dict)
    """``tenancy.source: APIKey``: Secret name → {tenant: API key} (embedded mode)."""
    shutdown_delay_s: float = 0.0
    """On SIGTERM, before the listeners close: readiness 503 and gRPC health NOT_SERVING while
    new requests are still served, for load balancers to stop sending (the chart passes 5 s,
    one readiness period). Counted before ``shutdown_grace_s``."""
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    """On SIGTERM, after ``shutdown_delay_s``: new connections, requests and streams are
    refused, and in-flight ones (proxy requests, ext_proc streams, Pick calls) get this long to
    finish. The chart passes the pod's ``terminationGracePeriodSeconds`` minus 10 s minus the
    delay."""


class Router:
    """One router process (or an in-process router in tests and the demo)."""

    def __init__(self, settings: RouterSettings, registry: PluginRegistry | None = None) -> None:
        from kvroute_router.scrape.scraper import MetricsScraper

        self.settings = settings
        self.datastore = Datastore()
        self.metrics = RouterMetrics()
        self.services = SharedServices()
        if registry is None:
            registry = register_builtin_plugins(PluginRegistry())
            if settings.kv_events:
                register_precise_prefix(registry)
        self.registry = registry
        self.director = Director(self.datastore, self.registry, self.metrics, self.services)
        self.scraper = MetricsScraper(self.datastore, settings.scrape_interval_s,
                                      metrics=self.metrics,
                                      idle_interval_s=settings.idle_scrape_interval_s,
                                      accounted_interval_s=settings.accounted_scrape_interval_s)
        self.datastore.add_listener(self._forget_removed)
        self.source: ConfigFileSource | KubernetesSource | None = None
        if settings.kubernetes:
            self.source = KubernetesSource(self.datastore, settings.namespace)
        elif settings.config_paths:
            self.source = ConfigFileSource(self.datastore, settings.config_paths,
                                           settings.config_poll_interval_s)
        self.tenants = TenantDirectory(self.datastore, self._api_keys)
        """Who each request's tenant is: one for the budget hook and the response cache."""
        self.response_cache = ResponseCache(
            self.datastore, ResponseCacheMetrics(self.metrics.registry), tenants=self.tenants)
        self.proxy = OpenAIProxy(self.director, self.datastore,
                                 trust_tenant_header=settings.trust_tenant_header,
                                 trusted_proxy_cidrs=settings.trusted_proxy_cidrs,
                                 response_cache=self.response_cache)
        self.caller_tokens: CallerTokens | None = (
            CallerTokens(settings.grpc_tokens_dir) if settings.grpc_tokens_dir else None)
        self.kv_event_feeds: KVEventFeeds | None = None
        if settings.kv_events and PrecisePrefixScorer.TYPE in self.registry:
            self.kv_event_feeds = KVEventFeeds(self.datastore, self.services, self.registry,
                                               settings.tokenizer_dirs)
            # Each pool's KV-event metrics live in their own registry: serve them here too.
            self.metrics.registry.register(KVEventMetricsCollector(self.kv_event_feeds))
        self.budget_metrics = BudgetMetrics(self.metrics.registry)
        from kvroute_router.difficulty import DifficultyRouter

        self.difficulty = DifficultyRouter(self.datastore, self.metrics.registry,
                                           quality_data=settings.quality_data)
        self.director.add_admission_hook(self.difficulty)
        self.budget_hook: BudgetHook | None = None
        self.peer_count: Any = None
        """``PeerCount`` of the router's Service (budget share without Redis), when set."""
        if settings.budgets:
            self.budget_hook = self._budget_hook(settings)
            self.director.add_admission_hook(self.budget_hook)
            self.director.add_completion_observer(self.budget_hook)  # releases queued requests
        self.replica_sync: ReplicaSync | None = None
        if settings.replica_sync_redis_url:
            self.replica_sync = ReplicaSync.from_url(
                settings.replica_sync_redis_url, self.datastore, self.services,
                self.metrics.registry)
            self.director.add_dispatch_listener(self.replica_sync.on_dispatch)
            self.director.add_answering_listener(self.replica_sync.on_answering)
            if self.budget_hook is not None:  # each replica releases its share of the room,
                # its own waiters among the fleet's oldest
                self.budget_hook.replicas = self.replica_sync.replicas
                self.budget_hook.peers_waiting = self.replica_sync.peers_waiting
                self.budget_hook.waiting_changed = self.replica_sync.on_waiting_changed
                self.replica_sync.waiting = self.budget_hook.waiting
        self._runtime_collector: RuntimeCollector | None = None
        self.probes = RuntimeProbes(self.metrics, settings.loop_lag_probe_s)
        self._runners: list[web.AppRunner] = []
        self._grpc_servers: list[Any] = []
        self.ports: dict[str, int] = {}
        self._freeze_task: asyncio.Task[None] | None = None
        self.draining = False
        """Set when shutdown begins: readiness answers 503 from then on."""
        # Readiness, next to the proxy's /health (liveness): 503 until the datastore has its
        # first complete listing, and again once shutdown begins.
        self.proxy.app.router.add_get("/ready", self._ready)

    def _budget_hook(self, settings: RouterSettings) -> BudgetHook:
        from kvroute_router.batching.quality import build_default_estimator

        store: MeterStore | None = None
        if settings.budget_redis_url:
            import redis.asyncio

            from kvroute_router.budget.meters import RedisMeterStore

            # Socket timeouts bound a black-holed Redis below the per-call asyncio timeout
            # (RoutePolicy spec.budgetStore.timeoutMs), which is what the request waits.
            store = RedisMeterStore(redis.asyncio.Redis.from_url(
                settings.budget_redis_url, socket_connect_timeout=2.0, socket_timeout=5.0))
        share = 1.0 if store is not None else settings.budget_replica_share
        ledger = BudgetLedger(store, replica_share=share, metrics=self.budget_metrics)
        if store is None and settings.budget_peer_service:
            from kvroute_router.datastore.peers import PeerCount

            def follow(replicas: int) -> None:
                ledger.replica_share = 1.0 / replicas
                log.info("budget limits shared by %d router replica(s): this one enforces "
                         "1/%d of each", replicas, replicas)

            self.peer_count = PeerCount(
                settings.budget_peer_namespace or settings.namespace or "default",
                settings.budget_peer_service, settings.pod_name, follow)
        return BudgetHook(self.datastore, metrics=self.budget_metrics, ledger=ledger,
                          estimator=build_default_estimator(
                              settings.quality_data, embedding=settings.quality_embedding,
                              background=True),
                          tenants=self.tenants,
                          refresh_interval_s=max(0.05, settings.scrape_interval_s))

    def _api_keys(self, policy: Any) -> dict[str, str]:
        """The embedded {tenant: API key} of a ``tenancy.source: APIKey`` policy."""
        ref = policy.spec.tenancy.api_keys_secret_ref
        return dict(self.settings.api_keys.get(ref.name, {})) if ref is not None else {}

    def _forget_removed(self, added: list[Any], removed: list[Any]) -> None:
        for ep in removed:
            self.registry.endpoint_removed(self.services, ep.pool, ep.name)

    def internal_sizes(self) -> dict[str, int]:
        """Entries of the in-memory tables that grow with traffic (``kvroute_internal_entries``;
        the KV index has its own gauges, ``kvroute_kv_index_blocks``)."""
        sizes = self.budget_hook.sizes() if self.budget_hook is not None else {}
        endpoints = self.datastore.endpoints()
        sizes["datastore_endpoints"] = len(endpoints)
        # Prefixes being computed by attempts in flight (scoring.prefillWaitMs): 0 when idle.
        sizes["prefill_in_flight"] = sum(len(ep.prefill_in_flight) for ep in endpoints)
        # Dispatches are recorded in the approximate history even under prefix-precise (its
        # fallback stays warm): bounded per endpoint, ~350 bytes an entry.
        sizes["prefix_approx_history_blocks"] = sum(
            history_entries(self.services, state.key) for state in self.datastore.pools())
        if self.kv_event_feeds is not None:
            sizes.update(self.kv_event_feeds.sizes())
        return sizes

    async def start(self) -> None:
        if self._runtime_collector is None:
            self._runtime_collector = RuntimeCollector(
                asyncio.get_running_loop(), self.internal_sizes,
                lambda: [(ep.pool, ep.name, ep.prefill_backlog)
                         for ep in self.datastore.endpoints()])
            self.metrics.registry.register(self._runtime_collector)
        self.probes.start(asyncio.get_running_loop())
        if isinstance(self.source, ConfigFileSource):
            self.source.load()
        if self.source is not None:
            await self.source.start()
        await self.scraper.start()
        if self.kv_event_feeds is not None:
            await self.kv_event_feeds.start()
        if self.budget_hook is not None:
            await self.budget_hook.start()
            if self.settings.budget_redis_url is None:
                log.warning("budget meters are in memory: a restart or rollout of this router "
                            "forgets the spend of the current windows (use --budget-redis-url "
                            "for long windows; docs/security.md)")
        if self.peer_count is not None:
            await self.peer_count.start()
        if self.replica_sync is not None:
            await self.replica_sync.start()
        s = self.settings
        if s.http_port is not None:
            self.ports["http"] = await self._serve_http(self.proxy.app, s.http_port)
        if s.metrics_port is not None:
            metrics_app = web.Application()
            metrics_app.router.add_get("/metrics", self._metrics)
            self.ports["metrics"] = await self._serve_http(metrics_app, s.metrics_port)
        if s.ext_proc_port is not None:
            from kvroute_router.extproc.server import start_ext_proc_server

            server, port = await start_ext_proc_server(
                self.director, s.host, s.ext_proc_port, catalog=self.datastore,
                response_cache=self.response_cache,
                trust_gateway_headers=s.ext_proc_trust_gateway_headers,
                tokens=self.caller_tokens if s.ext_proc_require_token else None)
            self._grpc_servers.append(server)
            self.ports["ext_proc"] = port
        if s.grpc_port is not None:
            from kvroute_router.grpcapi.server import start_router_grpc_server

            server, port = await start_router_grpc_server(self.director, s.host, s.grpc_port,
                                                          catalog=self.datastore,
                                                          tokens=self.caller_tokens)
            self._grpc_servers.append(server)
            self.ports["grpc"] = port
        log.info("router listening (%s event loop): %s", event_loop_name(),
                 ", ".join(f"{k}={v}" for k, v in self.ports.items()))
        if s.freeze_startup_heap:
            self._freeze_task = asyncio.get_running_loop().create_task(
                self._freeze_startup_heap(), name="gc-freeze")

    async def _freeze_startup_heap(self) -> None:
        """Take what start-up built out of the cyclic garbage collector, once.

        A full (generation 2) collection scans every tracked object; with start-up's (modules,
        tokenizers, plugins, the first pool sync) in the heap one took ~70 ms with 64 engines,
        a pause every request in flight waits out; after the freeze the same collection took
        3-5 ms (docs/benchmarks/router-cpu.md, round 8). Waits for the first complete listing
        and KV-event sync (bounded), then collects once (the garbage of start-up is freed, not
        frozen) and freezes the rest."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STARTUP_SETTLE_S):
                if self.source is not None:  # without one nothing will load
                    await self.datastore.wait_loaded()
                    if self.kv_event_feeds is not None:
                        await self.kv_event_feeds.synced.wait()
        freed = gc.collect()
        gc.freeze()
        log.info("start-up heap frozen: %d objects out of the cyclic collector (%d freed "
                 "first)", gc.get_freeze_count(), freed)

    def ready(self) -> bool:
        return self.datastore.loaded and not self.draining

    async def _ready(self, request: web.Request) -> web.Response:
        ready = self.ready()
        return web.json_response({"ready": ready, "loaded": self.datastore.loaded,
                                  "draining": self.draining}, status=200 if ready else 503)

    async def _serve_http(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                               logger=HTTP_PROTOCOL_LOG,
                               shutdown_timeout=self.settings.shutdown_grace_s)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, port, backlog=1024, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        addresses = runner.addresses  # the bound sockets' names: the port when 0 was asked
        return int(addresses[0][1]) if addresses else port

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stop(self) -> None:
        """Readiness false and gRPC health NOT_SERVING first (for ``shutdown_delay_s``, still
        serving), then every server stops accepting and its in-flight work gets
        ``shutdown_grace_s`` to finish (all servers at once, so the grace is not summed)."""
        from kvroute_router.grpc_health import enter_shutdown

        self.draining = True
        if self._freeze_task is not None:
            await cancel_and_wait([self._freeze_task], what="start-up heap freeze")
        for server in self._grpc_servers:
            await enter_shutdown(server)
        if self.settings.shutdown_delay_s > 0 and self.ports:
            log.info("draining: not ready; closing the listeners in %g s",
                     self.settings.shutdown_delay_s)
            await asyncio.sleep(self.settings.shutdown_delay_s)
        grace = self.settings.shutdown_grace_s
        await asyncio.gather(*(server.stop(grace=grace) for server in self._grpc_servers),
                             *(runner.cleanup() for runner in self._runners))
        self.probes.stop()
        await self.scraper.stop()
        await self.response_cache.stop()
        if self.budget_hook is not None:
            await self.budget_hook.stop()
        if self.peer_count is not None:
            await self.peer_count.stop()
        if self.replica_sync is not None:
            await self.replica_sync.stop()
        if self.kv_event_feeds is not None:
            await self.kv_event_feeds.stop()
        if self.source is not None:
            await self.source.stop()

    def run(self, event_loop: str = EVENT_LOOPS[0]) -> None:
        """Serve on a new ``event_loop`` (one of :data:`EVENT_LOOPS`) until SIGTERM or
        SIGINT."""
        if event_loop == "uvloop":
            import uvloop

            uvloop.run(self.serve_forever())
        elif event_loop == "asyncio":
            asyncio.run(self.serve_forever())
        else:
            raise ValueError(f"unknown event loop {event_loop!r}: one of {EVENT_LOOPS}")

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop the servers gracefully."""
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stopping.set)
        await self.start()
        try:
            await stopping.wait()
            log.info("stopping")
        finally:
            await self.stop()


def event_loop_name() -> str:
    """Which of :data:`EVENT_LOOPS` runs the calling coroutine."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.split(".")[0] == "uvloop" else "asyncio"
