"""Per-pool KV-event state: the prefix index, the hasher, the tokenizer and one subscriber per
engine — the object the router wires in and the ``prefix-precise`` scorer reads.

The router owns the lifecycle: it calls :meth:`PoolKVEvents.set_sources` (from its event loop)
whenever the pool's endpoints change — embedded mode from ``StaticEndpoint.kvEventsEndpoint`` /
``kvEventsReplayEndpoint``, Kubernetes from each ready pod's IP with the pool's
``engine.kvEvents.port`` / ``replayPort`` (5557 / 5558) — and :meth:`aclose` on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import zmq.asyncio
from kvroute_api.inference_pool import InferencePool

from kvroute_router.framework.request import LLMRequest
from kvroute_router.framework.tasks import DEFAULT_STOP_TIMEOUT_S, cancel_and_wait
from kvroute_router.kvevents.hashing import BlockHashConfig, BlockHasher, resolve_seed
from kvroute_router.kvevents.index import (
    DEFAULT_MAX_BLOCKS_PER_ENDPOINT,
    DEFAULT_PENDING_TTL_S,
    PrefixIndex,
)
from kvroute_router.kvevents.metrics import KVEventMetrics
from kvroute_router.kvevents.receiver import EventReceiver
from kvroute_router.kvevents.subscriber import (
    KVEventSource,
    KVEventSubscriber,
    SubscriberSettings,
    SubscriberStatus,
)
from kvroute_router.kvevents.tokenization import PromptTokenizer
from kvroute_router.router_metrics import Children

logger = logging.getLogger("kvroute.kvevents.hub")


def hash_config_for_pool(pool: InferencePool) -> BlockHashConfig:
    """The engines' hash settings: block size, algorithm, and the seed from their env."""
    engine = pool.spec.engine
    env = {var.name: var.value for var in engine.env}
    return BlockHashConfig(block_size=engine.block_size,
                           algorithm=engine.prefix_caching_hash_algo,
                           seed=resolve_seed(env.get("PYTHONHASHSEED")))


def pending_ttl_for_pool(pool: InferencePool) -> float:
    """Seconds a dispatched request's blocks count as held (``engine.kvEvents.pendingMs``)."""
    return pool.spec.engine.kv_events.pending_ms / 1000


def eviction_forecast_for_pool(pool: InferencePool) -> bool:
    """Whether the index forecasts the evictions dispatches cause
    (``engine.kvEvents.evictionForecast``)."""
    return pool.spec.engine.kv_events.eviction_forecast


def pod_source(endpoint_name: str, pod_ip: str, pool: InferencePool) -> KVEventSource:
    """Kubernetes: the pod's PUB and replay ports from the pool's ``engine.kvEvents`` (every
    topic: the operator's ``kv@<pod>`` and a user's own both match)."""
    spec = pool.spec.engine.kv_events
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return KVEventSource(endpoint=endpoint_name, events_endpoint=f"tcp://{host}:{spec.port}",
                         replay_endpoint=f"tcp://{host}:{spec.replay_port}")


class PoolKVEvents:
    """Everything precise prefix routing needs for one pool."""

    def __init__(self, hash_config: BlockHashConfig, *, metrics: KVEventMetrics | None = None,
                 tokenizer: PromptTokenizer | None = None,
                 settings: SubscriberSettings | None = None,
                 max_blocks_per_endpoint: int = DEFAULT_MAX_BLOCKS_PER_ENDPOINT,
                 pending_ttl: float = DEFAULT_PENDING_TTL_S,
                 eviction_forecast: bool = True,
                 context: zmq.asyncio.Context | None = None,
                 stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        self.hasher = BlockHasher(hash_config)
        self.index = PrefixIndex(max_blocks_per_endpoint, pending_ttl=pending_ttl,
                                 forecast_evictions=eviction_forecast)
        self.metrics = metrics or KVEventMetrics()
        self.metrics.watch_forecasts(lambda: self.index.forecast_counts())
        self.metrics.watch_dispatches(lambda: self.index.dispatch_counts())
        self._scorer_source = Children(self.metrics.scorer_source)
        self.tokenizer = tokenizer
        self.settings = settings or SubscriberSettings()
        self._context = context
        self.stop_timeout_s = stop_timeout_s
        self._subscribers: dict[str, tuple[KVEventSubscriber, asyncio.Task[None]]] = {}
        # One drain pass reads every engine's socket (:mod:`.receiver`).
        self._receiver = EventReceiver(coalesce_s=self.settings.receive_coalesce_s)

    @classmethod
    def for_pool(cls, pool: InferencePool, **kwargs: Any) -> PoolKVEvents:
        kwargs.setdefault("pending_ttl", pending_ttl_for_pool(pool))
        kwargs.setdefault("eviction_forecast", eviction_forecast_for_pool(pool))
        return cls(hash_config_for_pool(pool), **kwargs)

    async def set_sources(self, sources: Iterable[KVEventSource]) -> None:
        """Subscribe to exactly these engines: start new subscribers, stop departed ones
        (dropping their blocks), restart ones whose addresses changed."""
        wanted = {source.endpoint: source for source in sources}
        for name in list(self._subscribers):
            subscriber, _ = self._subscribers[name]
            if wanted.get(name) != subscriber.source:
                await self._stop(name)
                if name not in wanted:
                    self.index.remove_endpoint(name)
        for name, source in wanted.items():
            if name in self._subscribers:
                continue
            self.index.clear(name)
            subscriber = KVEventSubscriber(source, self.index, self.hasher, self.metrics,
                                           context=self._context, settings=self.settings,
                                           receiver=self._receiver)
            task = asyncio.create_task(subscriber.run(), name=f"kv-events:{name}")
            self._subscribers[name] = (subscriber, task)
            logger.info("kv-events: following %s at %s (replay %s)", name,
                        source.events_endpoint, source.replay_endpoint)

    async def _stop(self, name: str) -> None:
        """Stop one subscriber; returns within ``stop_timeout_s`` whatever its sockets do."""
        subscriber, task = self._subscribers.pop(name)
        subscriber.stop()
        if not await cancel_and_wait([task], what=f"kv-events subscriber {name}",
                                     timeout_s=self.stop_timeout_s):
            subscriber.abandon()

    async def aclose(self) -> None:
        """Stop every subscriber, together: returns within ``stop_timeout_s`` (plus the
        socket closes), whatever state each connection is in."""
        await asyncio.gather(*(self._stop(name) for name in list(self._subscribers)))

    def sizes(self) -> dict[str, int]:
        """Entries of this pool's bounded caches and queues (``kvroute_internal_entries``; the
        index's blocks have their own gauge)."""
        prompts, tokens = self.tokenizer.cache_size() if self.tokenizer else (0, 0)
        sizes = {"kv_tokenizer_cache_prompts": prompts, "kv_tokenizer_cache_tokens": tokens,
                 "kv_hash_memo_blocks": self.hasher.memo_size(),
                 "kv_index_pending_blocks": sum(self.index.pending_count(name)
                                                for name in self.index.endpoints())}
        for subscriber, _ in self._subscribers.values():
            for key, value in subscriber.sizes().items():
                sizes[key] = sizes.get(key, 0) + value
        return sizes

    def status(self, endpoint: str) -> SubscriberStatus | None:
        entry = self._subscribers.get(endpoint)
        return entry[0].status if entry else None

    def trustworthy(self, endpoint: str) -> bool:
        """Whether the index is right for this endpoint now (else: approximate fallback)."""
        status = self.status(endpoint)
        return status is not None and status.trustworthy

    # ---- kvroute_router.plugins.prefix_precise.PoolPrefixCache ------------------------------
    def prompt_block_hashes(self, request: LLMRequest) -> list[int] | None:
        """The prompt's block hashes as the engine computes them (its token ids, else the
        pool's tokenizer); None when it cannot be tokenised in process."""
        tokens: Sequence[int] | None
        if request.token_ids is not None:
            tokens = list(request.token_ids)
        elif self.tokenizer is None:
            return None
        elif request.openai is not None:
            tokens = self.tokenizer.tokenize_request(request.openai)
        else:
            tokens = self.tokenizer.tokenize(request.kind, None, prompt_text=request.prompt_text)
        if tokens is None:
            return None
        salt = request.openai.cache_salt if request.openai is not None else None
        return self.hasher.block_hashes(tokens, cache_salt=salt)

    def match(self, hashes: Sequence[int], endpoints: Sequence[str]) -> dict[str, int]:
        return self.index.match(hashes, endpoints)

    def mark_pending(self, endpoint: str, hashes: Sequence[int],
                     capacity: int | None = None, *, own: bool = True) -> None:
        self.index.mark_pending(endpoint, hashes, capacity, own=own)

    def record_scoring(self, precise: int | None, approximate: int,
                       best_match: int | None) -> None:
        if best_match is not None:
            self.metrics.match_blocks.observe(best_match)
        if precise is not None:
            self._scorer_source("precise").inc(precise)
        if approximate:
            self._scorer_source("approximate").inc(approximate)

    def statuses(self) -> list[dict[str, Any]]:
        """Every subscriber's status, for the router's debug/health endpoint."""
        return [subscriber.status.as_dict() for subscriber, _ in self._subscribers.values()]
