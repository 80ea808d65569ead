"""The response cache on the request path: one :meth:`ResponseCache.lookup` before routing,
one :meth:`CacheLookup.finish` after the engine answered.

A request uses the cache when its RoutePolicy has ``spec.responseCache`` naming a CacheTier
with ``spec.response``. Settings: ``similarityThreshold`` and ``ttlSeconds`` of the policy
override the tier's; ``scope`` Tenant keys entries by (policy, tenant), Global by policy only;
``allowSampling`` admits requests that sample (``temperature`` absent or > 0).

``lookup`` resolves the policy and tenant exactly as the director and the budget hook do
(``source: Header``: the tenant header as it reached the router — the proxy strips it from
untrusted clients; ``source: APIKey``: the bearer token's digest), then tries the exact key and,
when the threshold is below 1 and the request has a query text, the nearest entry of the same
partition. A hit never reaches the director: no engine, no admission queue, no budget
reservation (it is counted in ``kvroute_response_cache_hits_total`` per tenant instead). Any
backend or model failure is logged and served as a miss: the cache never fails a request.

Writes happen after the answer went to the client, in a background task, and only for a
complete HTTP 200 answer (see :mod:`kvroute_router.responsecache.answer`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from kvroute_api.cache_tier import CacheTier, ResponseCacheTierSpec
from kvroute_api.route_policy import ResponseCacheSpec

from kvroute_router.admission.tenancy import ApiKeyLookup, TenantDirectory
from kvroute_router.datastore.resolution import PolicyConflictError
from kvroute_router.datastore.store import Datastore, object_key
from kvroute_router.framework.request import LLMRequest
from kvroute_router.framework.tasks import cancel_and_wait
from kvroute_router.responsecache.answer import (
    AnswerRecorder,
    render_json,
    render_sse,
    usage_tokens,
)
from kvroute_router.responsecache.embedder import SentenceEmbedder, load_model
from kvroute_router.responsecache.key import CacheKey, cache_key, cacheability
from kvroute_router.responsecache.metrics import ResponseCacheMetrics
from kvroute_router.responsecache.store import Entry, MemoryStore, ResponseStore, Vector

log = logging.getLogger(__name__)

CACHE_HEADER = "x-kvroute-cache"
REDIS_URL_ENV = "KVROUTE_RESPONSE_CACHE_REDIS_URL"
"""The URL of a tier whose ``redis.urlSecretRef`` names a Secret the router has not read: in
Kubernetes mode the router reads that Secret by name (the datastore's
:meth:`~kvroute_router.datastore.store.Datastore.secret_value`); embedded mode (config file,
no Secrets) takes the URL from this variable."""
BACKEND_TIMEOUT_S = 2.0
Match = Literal["exact", "semantic", "miss"]


@dataclass
class CacheLookup:
    """The cache's verdict on one request."""

    match: Match | None = None
    """exact or semantic (a hit), miss, or None: the cache does not apply to this request."""
    answer: dict[str, Any] | None = None
    similarity: float | None = None
    policy: str = ""
    tenant: str = ""
    kind: str = "completions"
    model: str = ""
    stream: bool = False
    include_usage: bool = False
    _cache: ResponseCache | None = field(default=None, repr=False)
    _tier: str = ""
    _key: CacheKey | None = field(default=None, repr=False)
    _vector: Vector | None = field(default=None, repr=False)
    _ttl_s: float = 0.0

    @property
    def hit(self) -> bool:
        return self.answer is not None

    @property
    def header(self) -> str | None:
        """The ``x-kvroute-cache`` value to send, None when the cache does not apply."""
        return self.match

    def body(self) -> tuple[bytes, str]:
        """A hit as (body, content type) in the form the client asked for."""
        assert self.answer is not None
        if self.stream:
            return (render_sse(self.answer, self.kind, self.model, self.include_usage),
                    "text/event-stream")
        return render_json(self.answer, self.kind, self.model), "application/json"

    def recorder(self) -> AnswerRecorder | None:
        """Collects the engine's answer to a miss (None: nothing to record)."""
        if self.match != "miss" or self._cache is None:
            return None
        return AnswerRecorder(self.kind, self.stream)

    def finish(self, recorder: AnswerRecorder | None, status: int) -> None:
        """The engine's answer is complete (``status``: what the client got; a cut stream
        passes its error status): store it in the background when it is a success."""
        if recorder is None or self._cache is None or self._key is None:
            return
        self._cache.store(self, recorder.answer(status))


@dataclass
class _Tier:
    key: str
    spec: ResponseCacheTierSpec
    store: ResponseStore | None
    url: str | None = None
    embedder: SentenceEmbedder | None = None
    embedder_error: str | None = None
    loading: asyncio.Task[None] | None = None


class ResponseCache:
    """Lookups and writes of every policy with ``spec.responseCache``."""

    def __init__(self, datastore: Datastore, metrics: ResponseCacheMetrics, *,
                 api_keys: ApiKeyLookup | None = None, tenants: TenantDirectory | None = None,
                 clock: Callable[[], float] = time.time,
                 embedder_factory: Callable[[str], SentenceEmbedder] | None = None) -> None:
        self.datastore = datastore
        self.metrics = metrics
        self.tenants = tenants or TenantDirectory(datastore, api_keys)
        """Scopes entries by the tenant the budget hook charges (the app shares one)."""
        self.clock = clock
        self.embedder_factory = embedder_factory or (lambda name: SentenceEmbedder(
            load_model(name)))
        self._tiers: dict[str, _Tier] = {}
        self._embedders: dict[str, SentenceEmbedder] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- configuration -----------------------------------------------------------------------
    def _tier(self, namespace: str | None, settings: ResponseCacheSpec) -> _Tier | None:
        key = object_key(namespace, settings.cache_tier_ref.name)
        tier_obj: CacheTier | None = self.datastore.cache_tier(key)
        spec = tier_obj.spec.response if tier_obj is not None else None
        if tier_obj is None or spec is None:
            return None
        url = self._redis_url(tier_obj.metadata.namespace, spec)
        tier = self._tiers.get(key)
        if tier is not None and tier.spec == spec and tier.url == url:
            return tier
        if tier is not None and tier.store is not None:
            self._spawn(tier.store.close())
        tier = _Tier(key=key, spec=spec, store=self._open_store(key, spec, url), url=url)
        self._tiers[key] = tier
        return tier

    def _redis_url(self, namespace: str | None,
                   spec: ResponseCacheTierSpec) -> str | None:
        """The tier's Redis URL: the value of ``redis.urlSecretRef`` (read by the Kubernetes
        source), else ``$KVROUTE_RESPONSE_CACHE_REDIS_URL`` (embedded mode), else
        ``redis.url``."""
        if spec.backend != "redis" or spec.redis is None:
            return None
        ref = spec.redis.url_secret_ref
        if ref is None:
            return spec.redis.url
        return (self.datastore.secret_value(object_key(namespace, ref.name), ref.key)
                or os.environ.get(REDIS_URL_ENV) or spec.redis.url)

    def _open_store(self, key: str, spec: ResponseCacheTierSpec,
                    url: str | None) -> ResponseStore | None:
        if spec.backend == "memory":
            return MemoryStore(spec.max_entries, clock=self.clock)
        assert spec.redis is not None  # the API's rule
        if not url:
            ref = spec.redis.url_secret_ref
            log.error("CacheTier %s: the Secret key %s of redis.urlSecretRef is not readable "
                      "(yet), and %s is not set; the response cache of this tier is off until "
                      "it is", key, f"{ref.name}/{ref.key}" if ref else "?", REDIS_URL_ENV)
            return None
        import redis.asyncio

        from kvroute_router.responsecache.redis_store import RedisStore

        client = redis.asyncio.Redis.from_url(url, socket_timeout=BACKEND_TIMEOUT_S,
                                              socket_connect_timeout=BACKEND_TIMEOUT_S)
        return RedisStore(client, f"{spec.redis.key_prefix}rc:{key}:", spec.max_entries,
                          clock=self.clock)

    def _embedder(self, tier: _Tier) -> SentenceEmbedder | None:
        """The tier's model once loaded; loading starts in a thread on first use (lookups go
        exact-only meanwhile)."""
        name = tier.spec.embedding_model
        if name in self._embedders:
            return self._embedders[name]
        if tier.embedder_error is None and tier.loading is None:
            tier.loading = self._spawn(self._load_embedder(tier, name))
        return None

    async def _load_embedder(self, tier: _Tier, name: str) -> None:
        try:
            self._embedders[name] = await asyncio.to_thread(self.embedder_factory, name)
            log.info("response cache: embedding model %s loaded", name)
        except Exception as exc:
            tier.embedder_error = str(exc)
            log.error("response cache of CacheTier %s: cannot load embedding model %s (%s); "
                      "exact matches only", tier.key, name, exc)

    async def warm_up(self) -> None:
        """Load the embedding model of every configured tier now (start-up, tests)."""
        for policy in self.datastore.policies().values():
            settings = policy.spec.response_cache
            tier = self._tier(policy.metadata.namespace, settings) if settings else None
            if tier is None:
                continue
            self._embedder(tier)
            if tier.loading is not None:
                await tier.loading

    # ---- lookups -----------------------------------------------------------------------------
    async def lookup(self, request: LLMRequest) -> CacheLookup:
        """The cached answer for ``request`` (a parsed completions or chat request), a miss
        to record, or a verdict that the cache does not apply."""
        body = request.openai.body if request.openai is not None else None
        if body is None or request.kind == "pick":
            return CacheLookup()
        try:
            resolution = self.datastore.resolve(request.model, request.headers)
        except PolicyConflictError:  # the director answers 409 naming both policies
            return CacheLookup()
        if resolution is None or resolution.implicit:
            return CacheLookup()
        policy = resolution.policy
        settings = policy.spec.response_cache
        if settings is None:
            return CacheLookup()
        tier = self._tier(policy.metadata.namespace, settings)
        name = policy.metadata.name
        if tier is None:
            self.metrics.lookups.labels(name, object_key(policy.metadata.namespace,
                                                         settings.cache_tier_ref.name),
                                        "error").inc()
            return CacheLookup()
        tier_name = tier.key
        options = body.get("stream_options")
        lookup = CacheLookup(
            match="miss", policy=name, kind=request.kind, model=request.model,
            stream=request.stream,
            include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
            _tier=tier.key)
        if tier.store is None or cacheability(body, settings.allow_sampling) is not None:
            self.metrics.lookups.labels(name, tier_name,
                                        "error" if tier.store is None else "skipped").inc()
            return lookup
        tenant = self.tenants.tenant_of(policy, request.headers)
        scope = resolution.policy_key + ("\x00" + tenant if settings.scope == "Tenant" else "")
        key = cache_key(body, request.kind, request.model, scope)
        lookup.tenant = tenant
        lookup._cache, lookup._key = self, key
        lookup._ttl_s = float(settings.ttl_seconds or tier.spec.ttl_seconds)
        threshold = (settings.similarity_threshold if settings.similarity_threshold is not None
                     else tier.spec.similarity_threshold)
        store = tier.store
        try:
            started = time.perf_counter()
            async with asyncio.timeout(BACKEND_TIMEOUT_S):
                raw = await store.get_exact(key.exact)
            spent = time.perf_counter() - started
            if raw is None and threshold < 1.0 and key.text is not None:
                embedder = self._embedder(tier)
                if embedder is not None:
                    embed_started = time.perf_counter()
                    lookup._vector = await asyncio.to_thread(embedder.embed, key.text)
                    self.metrics.embedding_seconds.observe(time.perf_counter() - embed_started)
                    started = time.perf_counter()
                    async with asyncio.timeout(BACKEND_TIMEOUT_S):
                        found = await store.search(key.partition, lookup._vector, threshold)
                    spent += time.perf_counter() - started
                    if found is not None:
                        raw, lookup.similarity = found
                        lookup.match = "semantic"
            elif raw is not None:
                lookup.match = "exact"
            self.metrics.lookup_seconds.labels(store.backend).observe(spent)
        except Exception as exc:  # the cache never fails a request
            log.warning("response-cache lookup in %s failed: %s", tier.key, exc)
            self.metrics.lookups.labels(name, tier_name, "error").inc()
            lookup.match, lookup._cache = "miss", None
            return lookup
        if raw is not None:
            try:
                answer = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                answer = None
            if isinstance(answer, dict):
                lookup.answer = answer
                self._count_hit(lookup)
                return lookup
            lookup.match = "miss"
        self.metrics.lookups.labels(name, tier_name, "miss").inc()
        return lookup

    def _count_hit(self, lookup: CacheLookup) -> None:
        assert lookup.answer is not None and lookup.match is not None
        self.metrics.lookups.labels(lookup.policy, lookup._tier, lookup.match).inc()
        self.metrics.hits.labels(lookup.policy, lookup.tenant, lookup.match).inc()
        prompt, completion = usage_tokens(lookup.answer)
        self.metrics.hit_tokens.labels(lookup.policy, lookup.tenant, "prompt").inc(prompt)
        self.metrics.hit_tokens.labels(lookup.policy, lookup.tenant, "completion").inc(
            completion)

    # ---- writes ------------------------------------------------------------------------------
    def store(self, lookup: CacheLookup, answer: dict[str, Any] | None) -> None:
        tier = self._tiers.get(lookup._tier)
        tier_name = lookup._tier
        if answer is None or tier is None or tier.store is None or lookup._key is None:
            self.metrics.writes.labels(tier_name, "rejected").inc()
            return
        entry = Entry(id=lookup._key.exact, partition=lookup._key.partition,
                      vector=lookup._vector, answer=msgspec.json.encode(answer),
                      expires_at=self.clock() + lookup._ttl_s)
        self._spawn(self._put(tier, tier_name, entry, lookup._key.text))

    async def _put(self, tier: _Tier, tier_name: str, entry: Entry, text: str | None) -> None:
        store = tier.store
        assert store is not None
        try:
            if entry.vector is None and text is not None and tier.spec.similarity_threshold < 1:
                embedder = self._embedder(tier)
                if embedder is not None:  # the lookup ran before the model was loaded
                    entry.vector = await asyncio.to_thread(embedder.embed, text)
            async with asyncio.timeout(BACKEND_TIMEOUT_S):
                evicted = await store.put(entry)
                entries = await store.entries()
        except Exception as exc:
            log.warning("response-cache write to %s failed: %s", tier.key, exc)
            self.metrics.writes.labels(tier_name, "error").inc()
            return
        self.metrics.writes.labels(tier_name, "stored").inc()
        if evicted:
            self.metrics.evictions.labels(tier_name).inc(evicted)
        self.metrics.entries.labels(tier_name, store.backend).set(entries)

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Wait for pending writes (tests, shutdown)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks), timeout=30.0)

    async def stop(self) -> None:
        if self._tasks:
            await cancel_and_wait(list(self._tasks), what="response cache")
        for tier in self._tiers.values():
            if tier.store is not None:
                await tier.store.close()
        self._tiers.clear()


__all__ = ["CACHE_HEADER", "REDIS_URL_ENV", "CacheLookup", "ResponseCache"]
