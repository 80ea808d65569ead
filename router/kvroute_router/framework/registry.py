"""The plugin registry: factories keyed by type name (the names RoutePolicy.spec.scoring uses).

Nothing registers itself at import time; :func:`kvroute_router.plugins.register_builtin_plugins`
fills a registry explicitly, and other subpackages add theirs the same way (e.g. the KV-event
index registers ``prefix-precise``). A factory gets a :class:`PluginContext` and returns the
plugin.

What the framework must know about particular plugins is declared by the plugins when they
register, never named here: which filters every profile runs (``default_filter``), which
scorers' scores are prefix-match ratios (``prefix_match``, the ``kvroute_prefix_match_ratio``
metric), which registered type stands in for a missing one (:meth:`PluginRegistry.add_fallback`),
and what must be forgotten when an endpoint leaves (:meth:`PluginRegistry.on_endpoint_removed`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from kvroute_api.inference_pool import InferencePool
from kvroute_api.route_policy import AdmissionSpec, ScoringSpec

PluginKind = Literal["filter", "scorer", "picker"]
T = TypeVar("T")


class SharedServices:
    """Long-lived objects shared by plugin instances across profile rebuilds (config reloads),
    e.g. the approximate prefix history of a pool. Keyed by string; created on first use."""

    def __init__(self) -> None:
        self._objects: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get_or_create(self, key: str, kind: type[T], factory: Callable[[], T]) -> T:
        with self._lock:
            value = self._objects.get(key)
            if not isinstance(value, kind):
                value = factory()
                self._objects[key] = value
            return value

    def get(self, key: str, kind: type[T]) -> T | None:
        value = self._objects.get(key)
        return value if isinstance(value, kind) else None

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._objects[key] = value

    def drop_prefix(self, prefix: str) -> None:
        with self._lock:
            for key in [k for k in self._objects if k.startswith(prefix)]:
                del self._objects[key]


REPLICA_COUNT = "router/replica-count"
"""The :class:`SharedServices` key of the router's :class:`ReplicaCount`, absent without replica
sync."""


@dataclass(frozen=True)
class ReplicaCount:
    """How many router replicas route now, this one included, as replica sync counts them
    (``ReplicaSync.replicas``); put under :data:`REPLICA_COUNT` for the plugins that weigh
    their decisions by it (``prefill-cost``)."""

    count: Callable[[], int]


@dataclass(frozen=True)
class PluginContext:
    """What a factory may use to build a plugin for one (policy, pool) profile."""

    scoring: ScoringSpec
    pool_key: str
    """The pool's datastore key (``namespace/name``)."""
    pool: InferencePool | None
    services: SharedServices
    policy_key: str = ""
    admission: AdmissionSpec | None = None
    """The policy's ``spec.admission`` (saturation thresholds for load-aware plugins); None
    means the API defaults."""


PluginFactory = Callable[[PluginContext], Any]


EndpointRemoved = Callable[[SharedServices, str, str], None]
"""Told ``(services, pool key, endpoint name)`` when an endpoint leaves its pool."""


@dataclass(frozen=True)
class Registration:
    kind: PluginKind
    factory: PluginFactory
    default_filter: bool = False
    """A filter every profile runs (in registration order), whatever the policy says."""
    prefix_match: bool = False
    """A scorer whose score is the share of the prompt the endpoint holds (0-1)."""
    reads_prefix_held: bool = False
    """A scorer that reads the prefix scorers' match ratios (``profile.STATE_PREFIX_HELD``):
    the profile runs the policy's prefix scorers before it, even those at weight 0."""


class PluginRegistry:
    """Factories by type name, and what plugins declared about themselves."""

    def __init__(self) -> None:
        self._entries: dict[str, Registration] = {}
        self._fallbacks: dict[str, str] = {}
        self._removal_listeners: list[EndpointRemoved] = []

    def register(self, type_name: str, kind: PluginKind, factory: PluginFactory, *,
                 default_filter: bool = False, prefix_match: bool = False,
                 reads_prefix_held: bool = False) -> None:
        """Add (or replace: a later registration overrides a built-in) a plugin type."""
        if default_filter and kind != "filter":
            raise ValueError(f"{type_name}: only a filter can be a default filter")
        self._entries.pop(type_name, None)  # a replacement takes the new position
        self._entries[type_name] = Registration(kind, factory, default_filter, prefix_match,
                                                reads_prefix_held)

    def add_fallback(self, missing: str, stand_in: str) -> None:
        """When a policy names ``missing`` and it is not registered, ``stand_in`` is used."""
        self._fallbacks[missing] = stand_in

    def fallback_for(self, type_name: str) -> str | None:
        return self._fallbacks.get(type_name)

    def default_filters(self) -> list[str]:
        """The filters every profile runs, in registration order."""
        return [t for t, r in self._entries.items() if r.default_filter]

    def prefix_match_scorers(self) -> frozenset[str]:
        return frozenset(t for t, r in self._entries.items() if r.prefix_match)

    def on_endpoint_removed(self, listener: EndpointRemoved) -> None:
        """Call ``listener`` for every endpoint that leaves a pool (plugins' per-endpoint state)."""
        self._removal_listeners.append(listener)

    def endpoint_removed(self, services: SharedServices, pool_key: str, endpoint: str) -> None:
        for listener in self._removal_listeners:
            listener(services, pool_key, endpoint)

    def lookup(self, type_name: str) -> Registration | None:
        return self._entries.get(type_name)

    def types(self, kind: PluginKind | None = None) -> list[str]:
        return sorted(t for t, r in self._entries.items() if kind is None or r.kind == kind)

    def __contains__(self, type_name: str) -> bool:
        return type_name in self._entries
