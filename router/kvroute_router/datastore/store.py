"""The datastore: pools, policies and their endpoints, with the lookups the director needs.

Sources (the config file watcher, the Kubernetes watcher) call the ``set_*``/``delete_*``/
``replace`` methods on the event loop; readers get consistent snapshots because every change
swaps whole dictionaries. Endpoint objects survive updates that keep their name and address,
so in-flight counts and metrics are not lost on reload. Listeners hear about endpoints that
come and go (the scraper starts and stops its loops; the KV-event subscriber can do the same).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from kvroute_api.cache_tier import CacheTier
from kvroute_api.inference_pool import InferencePool
from kvroute_api.route_policy import PoolTarget, RoutePolicy, ScoringSpec

from kvroute_router.datastore.resolution import (
    NAMESPACE_HEADER,
    PoolView,
    client_models,
    directly_reachable,
    implied_policy,
    pick_direct_pools,
    pick_policy,
    policy_pools,
    rejected_by_operator,
    targeted_pools,
)
from kvroute_router.framework.endpoint import Endpoint

log = logging.getLogger(__name__)

EndpointListener = Callable[[list[Endpoint], list[Endpoint]], None]
"""Called with (added, removed) endpoints."""
PoolListener = Callable[[str], None]
"""Called with the key of a pool whose spec was set (added or edited)."""
PolicyListener = Callable[[], None]
"""Called after the set of RoutePolicies changed (one added, edited or deleted, or all
replaced)."""


def object_key(namespace: str | None, name: str) -> str:
    """``namespace/name``; objects without a namespace (config files) live in ``default``."""
    return f"{namespace or 'default'}/{name}"


@dataclass(frozen=True)
class EndpointSpec:
    """An endpoint as a source describes it."""

    name: str
    address: str
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass
class PoolState:
    """A pool and its current endpoints."""

    key: str
    pool: InferencePool
    endpoints: dict[str, Endpoint] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.pool.metadata.name

    @property
    def model_name(self) -> str:
        return self.pool.spec.model.name


@dataclass(frozen=True)
class Resolution:
    """What a model name resolves to: the policy (explicit or implied by a pool) and its
    pools as (state, target) pairs, primaries and fallbacks in policy order."""

    policy: RoutePolicy
    policy_key: str
    implicit: bool
    pools: list[tuple[PoolState | None, PoolTarget]]


class Datastore:
    """Pools, policies and endpoints."""

    def __init__(self) -> None:
        self._pools: dict[str, PoolState] = {}
        self._policies: dict[str, RoutePolicy] = {}
        self._api_keys: dict[str, dict[str, str]] = {}
        self._secret_values: dict[str, dict[str, str]] = {}
        self._cache_tiers: dict[str, CacheTier] = {}
        self._listeners: list[EndpointListener] = []
        self._pool_listeners: list[PoolListener] = []
        self._policy_listeners: list[PolicyListener] = []
        self.version = 0
        """Bumped on every pool or policy change (profile caches key on it)."""
        self._loaded = asyncio.Event()

    @property
    def loaded(self) -> bool:
        """True once a source delivered its first complete state."""
        return self._loaded.is_set()

    @loaded.setter
    def loaded(self, value: bool) -> None:
        if value:
            self._loaded.set()
        else:
            self._loaded.clear()

    async def wait_loaded(self) -> None:
        """Until a source delivered its first complete state."""
        await self._loaded.wait()

    # ---- listeners -------------------------------------------------------------------------
    def add_listener(self, listener: EndpointListener) -> None:
        self._listeners.append(listener)

    def add_pool_listener(self, listener: PoolListener) -> None:
        self._pool_listeners.append(listener)

    def add_policy_listener(self, listener: PolicyListener) -> None:
        self._policy_listeners.append(listener)

    def _notify_policies(self) -> None:
        for listener in self._policy_listeners:
            try:
                listener()
            except Exception:
                log.exception("policy listener failed")

    def _notify(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        if not added and not removed:
            return
        for listener in self._listeners:
            try:
                listener(added, removed)
            except Exception:
                log.exception("endpoint listener failed")

    # ---- writes ----------------------------------------------------------------------------
    def set_pool(self, pool: InferencePool, endpoints: Iterable[EndpointSpec] | None = None
                 ) -> None:
        """Add or update a pool; ``endpoints`` replaces its endpoint set when given (static
        endpoints of External pools are used when None)."""
        key = object_key(pool.metadata.namespace, pool.metadata.name)
        old = self._pools.get(key)
        if endpoints is None:
            if pool.spec.endpoints:
                endpoints = static_endpoints(pool)
            elif old is not None:
                endpoints = [spec_of(ep) for ep in old.endpoints.values()]
            else:
                endpoints = []
        state = PoolState(key=key, pool=pool)
        added, removed = self._merge(state, old, list(endpoints))
        pools = dict(self._pools)
        pools[key] = state
        self._pools = pools
        self.version += 1
        self._notify(added, removed)
        for listener in self._pool_listeners:
            try:
                listener(key)
            except Exception:
                log.exception("pool listener failed")

    def set_pool_endpoints(self, pool_key: str, endpoints: Iterable[EndpointSpec]) -> None:
        old = self._pools.get(pool_key)
        if old is None:
            return
        state = PoolState(key=pool_key, pool=old.pool)
        added, removed = self._merge(state, old, list(endpoints))
        pools = dict(self._pools)
        pools[pool_key] = state
        self._pools = pools
        if added or removed:
            self.version += 1
        self._notify(added, removed)

    def delete_pool(self, key: str) -> None:
        pools = dict(self._pools)
        old = pools.pop(key, None)
        if old is None:
            return
        self._pools = pools
        self.version += 1
        self._notify([], list(old.endpoints.values()))

    def set_policy(self, policy: RoutePolicy) -> None:
        policies = dict(self._policies)
        policies[object_key(policy.metadata.namespace, policy.metadata.name)] = policy
        self._policies = policies
        self.version += 1
        self._notify_policies()

    def delete_policy(self, key: str) -> None:
        policies = dict(self._policies)
        if policies.pop(key, None) is not None:
            self._policies = policies
            self.version += 1
            self._notify_policies()

    def set_cache_tier(self, tier: CacheTier) -> None:
        tiers = dict(self._cache_tiers)
        tiers[object_key(tier.metadata.namespace, tier.metadata.name)] = tier
        self._cache_tiers = tiers
        self.version += 1

    def delete_cache_tier(self, key: str) -> None:
        tiers = dict(self._cache_tiers)
        if tiers.pop(key, None) is not None:
            self._cache_tiers = tiers
            self.version += 1

    def cache_tier(self, key: str) -> CacheTier | None:
        """The CacheTier ``namespace/name`` (the response cache reads ``spec.response``)."""
        return self._cache_tiers.get(key)

    def cache_tier_keys(self) -> list[str]:
        return list(self._cache_tiers)

    def set_api_keys(self, secret_key: str, digests: Mapping[str, str]) -> None:
        """The API-key table (sha256 digest → tenant) of the Secret ``namespace/name``; a
        changed table bumps ``version`` so the budget hook rebuilds its tenant resolvers."""
        if self._api_keys.get(secret_key) == digests:
            return
        tables = dict(self._api_keys)
        tables[secret_key] = dict(digests)
        self._api_keys = tables
        self.version += 1

    def delete_api_keys(self, secret_key: str) -> None:
        tables = dict(self._api_keys)
        if tables.pop(secret_key, None) is not None:
            self._api_keys = tables
            self.version += 1

    def api_keys(self, secret_key: str) -> Mapping[str, str] | None:
        """The digest table of a Secret (``namespace/name``), None when none is known; the
        same object until the Secret changes."""
        return self._api_keys.get(secret_key)

    def api_key_secrets(self) -> list[str]:
        return list(self._api_keys)

    def set_secret_values(self, secret_key: str, values: Mapping[str, str]) -> None:
        """The values of the data keys that CacheTiers name (``redis.urlSecretRef``) in the
        Secret ``namespace/name``; only those keys are kept."""
        tables = dict(self._secret_values)
        tables[secret_key] = dict(values)
        self._secret_values = tables

    def delete_secret_values(self, secret_key: str) -> None:
        tables = dict(self._secret_values)
        if tables.pop(secret_key, None) is not None:
            self._secret_values = tables

    def secret_value(self, secret_key: str, data_key: str) -> str | None:
        """A CacheTier's Secret value (``namespace/name``, key), None when not read."""
        return self._secret_values.get(secret_key, {}).get(data_key)

    def value_secrets(self) -> list[str]:
        return list(self._secret_values)

    def replace(self, pools: Iterable[InferencePool], policies: Iterable[RoutePolicy],
                cache_tiers: Iterable[CacheTier] = ()) -> None:
        """Make the store hold exactly these objects (a config file was (re)loaded)."""
        pools = list(pools)
        wanted = {object_key(p.metadata.namespace, p.metadata.name) for p in pools}
        for key in [k for k in self._pools if k not in wanted]:
            self.delete_pool(key)
        for pool in pools:
            self.set_pool(pool)
        self._policies = {object_key(p.metadata.namespace, p.metadata.name): p
                          for p in policies}
        self._cache_tiers = {object_key(t.metadata.namespace, t.metadata.name): t
                             for t in cache_tiers}
        self.version += 1
        self.loaded = True
        self._notify_policies()

    def _merge(self, state: PoolState, old: PoolState | None,
               specs: list[EndpointSpec]) -> tuple[list[Endpoint], list[Endpoint]]:
        previous = dict(old.endpoints) if old else {}
        added: list[Endpoint] = []
        for spec in specs:
            ep = previous.pop(spec.name, None)
            if ep is not None and ep.address == spec.address:
                ep.kv_events_endpoint = spec.kv_events_endpoint
                ep.kv_events_replay_endpoint = spec.kv_events_replay_endpoint
                ep.labels = dict(spec.labels)
            else:
                if ep is not None:
                    previous[spec.name] = ep  # same name, new address: replace the object
                ep = Endpoint(name=spec.name, address=spec.address, pool=state.key,
                              kv_events_endpoint=spec.kv_events_endpoint,
                              kv_events_replay_endpoint=spec.kv_events_replay_endpoint,
                              labels=dict(spec.labels))
                added.append(ep)
            state.endpoints[spec.name] = ep
        removed = [ep for ep in previous.values() if ep is not state.endpoints.get(ep.name)]
        return added, removed

    # ---- reads -----------------------------------------------------------------------------
    def pool(self, key: str) -> PoolState | None:
        return self._pools.get(key)

    def pools(self) -> list[PoolState]:
        return list(self._pools.values())

    def policies(self) -> dict[str, RoutePolicy]:
        return dict(self._policies)

    def endpoints(self) -> list[Endpoint]:
        return [ep for state in self._pools.values() for ep in state.endpoints.values()]

    def endpoint_by_address(self, address: str) -> Endpoint | None:
        for state in self._pools.values():
            for ep in state.endpoints.values():
                if ep.address == address:
                    return ep
        return None

    def models(self, scope: str | None = None) -> list[str]:
        """Model names clients may use (in namespace ``scope``, or all): policies' names (not
        refused by the operator) and the served names of pools reachable directly
        (:mod:`.resolution`)."""
        return client_models(self._policies, self._reachable(), scope)

    def scoring_by_pool(self) -> dict[str, list[ScoringSpec]]:
        """Per pool key, the ``scoring`` of every policy that can route to it: the policies
        targeting it (not refused by the operator) and, for a pool reachable by its served
        name, the implied default policy's."""
        out: dict[str, list[ScoringSpec]] = {}
        for policy in self._policies.values():
            if rejected_by_operator(policy):
                continue
            for key in policy_pools(policy):
                out.setdefault(key, []).append(policy.spec.scoring)
        for view in self._reachable():
            out.setdefault(view.key, []).append(
                implied_policy(view.model_name, [view]).spec.scoring)
        return out

    def _reachable(self) -> list[PoolView]:
        targeted = targeted_pools(self._policies.values())
        return directly_reachable((_view(s) for s in self._pools.values()), targeted)

    def resolve(self, model: str, headers: Mapping[str, str]) -> Resolution | None:
        """The policy for ``model`` in the request's namespace scope (the trusted
        ``x-kvroute-namespace`` header), or the default policy implied by the directly
        reachable pools serving ``model``; raises :class:`PolicyConflictError` when two
        claim it (:mod:`.resolution`)."""
        scope = headers.get(NAMESPACE_HEADER) or None
        chosen = pick_policy(model, headers, self._policies, scope)
        if chosen is not None:
            key, policy = chosen
            namespace = policy.metadata.namespace
            return Resolution(policy=policy, policy_key=key, implicit=False, pools=[
                (self._pools.get(object_key(namespace, t.name)), t) for t in policy.spec.pools])
        serving = pick_direct_pools(model, self._reachable(), scope)
        if not serving:
            return None
        return Resolution(policy=implied_policy(model, serving), policy_key=f"implicit/{model}",
                          implicit=True,
                          pools=[(self._pools[p.key], PoolTarget(name=p.name)) for p in serving])


def _view(state: PoolState) -> PoolView:
    meta = state.pool.metadata
    return PoolView(key=state.key, namespace=meta.namespace or "default", name=meta.name,
                    model_name=state.model_name, direct_access=state.pool.spec.direct_access)


def static_endpoints(pool: InferencePool) -> list[EndpointSpec]:
    return [EndpointSpec(name=e.name or e.address, address=e.address,
                         kv_events_endpoint=e.kv_events_endpoint,
                         kv_events_replay_endpoint=e.kv_events_replay_endpoint)
            for e in pool.spec.endpoints]


def spec_of(ep: Endpoint) -> EndpointSpec:
    return EndpointSpec(name=ep.name, address=ep.address,
                        kv_events_endpoint=ep.kv_events_endpoint,
                        kv_events_replay_endpoint=ep.kv_events_replay_endpoint,
                        labels=dict(ep.labels))
