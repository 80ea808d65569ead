"""Kubernetes mode: the datastore fed by watches of InferencePools, RoutePolicies and Pods.

Each kind is listed and then watched (``kubernetes`` client, in a worker thread per kind, with
a server-side ``timeout_seconds`` and re-list on expiry or error); events are applied to the
datastore on the event loop. A half-open connection (the API server or a load balancer gone
without a FIN) would leave a watch reading forever and the endpoints stale, so every call
carries a client-side ``_request_timeout`` (the read timeout outlasts the server's watch
timeout), and a **watchdog** on the event loop restarts a kind's watch whose thread has shown
no sign of life (a listing, an event, a watch ending) for ``stall_s``; the stale thread's
later events are ignored (a generation number) and it ends at its next read. The datastore is
``loaded`` (the router's readiness) once pools, policies and pods have each been listed.

A pool's endpoints are its ready Pods with an IP, matched by the
label selector the operator writes to ``status.selector`` (Managed pools), else
``spec.selector.matchLabels`` (External pools), on port ``spec.engine.port``; External pools with
static ``spec.endpoints`` use those. :data:`kvroute_router.rbac.ROUTER_RULES` lists the
permissions this needs.

Secrets, for ``tenancy.source: APIKey``, are read **by name only** (least privilege,
docs/security.md): a Secret that a RoutePolicy of the same namespace names in
``spec.tenancy.apiKeysSecretRef`` is ``get`` when a policy starts naming it and again every
``SECRET_REFRESH_S`` (a rotation applies within that time); Secrets are never listed or watched,
so the router needs no permission on any other Secret (the chart grants ``get`` with
``resourceNames``). Its data (tenant → API key, one key per line) is turned into SHA-256 digests
at once (:func:`~kvroute_router.datastore.api_keys.digests_of_secret`) and stored in the
datastore, and no key is ever logged. A Secret that is gone (404) or no policy names any more is
forgotten.

CacheTiers' ``spec.response.redis.urlSecretRef`` (the Redis URL with credentials) are read the
same way: the Secret named, in the CacheTier's namespace, ``get`` by name when a tier starts
naming it and every ``SECRET_REFRESH_S``; only the named data key is kept
(:meth:`~kvroute_router.datastore.store.Datastore.secret_value`), never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kvroute_api.cache_tier import CacheTier
from kvroute_api.inference_pool import InferencePool
from kvroute_api.meta import GROUP, VERSION
from kvroute_api.route_policy import RoutePolicy
from pydantic import ValidationError

from kvroute_router.datastore.api_keys import digests_of_secret, secret_strings
from kvroute_router.datastore.store import Datastore, EndpointSpec, object_key
from kvroute_router.framework.tasks import cancel_and_wait

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 60
"""Server-side watch timeout: a quiet watch ends and is re-established this often."""
READ_TIMEOUT_S = 90.0
"""Client-side read timeout of lists and watches (longer than the server's watch timeout)."""
CONNECT_TIMEOUT_S = 10.0
STALL_S = 150.0
"""A watch thread silent for this long is replaced by the watchdog."""
LISTED_FOR_READY = frozenset({"inferencepools", "routepolicies", "pods"})
SECRET_REFRESH_S = 60.0
"""Secrets named by policies and CacheTiers are re-read by name this often."""


def parse_selector(text: str) -> dict[str, str]:
    """``a=b,c=d`` (equality-based selector) → labels; other terms are ignored."""
    labels: dict[str, str] = {}
    for term in text.split(","):
        key, sep, value = term.partition("=")
        if sep and not key.endswith("!"):
            labels[key.strip()] = value.lstrip("=").strip()
    return labels


def pool_selector(pool: InferencePool) -> dict[str, str] | None:
    if pool.status is not None and pool.status.selector:
        return parse_selector(pool.status.selector)
    if pool.spec.selector is not None:
        return dict(pool.spec.selector.match_labels)
    return None


def pod_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    if not status.get("podIP") or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in status.get("conditions") or [])


class KubernetesSource:
    """Watches one namespace (or all) and keeps the datastore in step."""

    def __init__(self, datastore: Datastore, namespace: str | None = None,
                 api_client: Any | None = None, *, watch_timeout_s: int = WATCH_TIMEOUT_S,
                 read_timeout_s: float = READ_TIMEOUT_S, stall_s: float = STALL_S,
                 retry_s: float = 2.0) -> None:
        self.datastore = datastore
        self.namespace = namespace
        self._api_client = api_client
        self.watch_timeout_s = watch_timeout_s
        self.read_timeout_s = read_timeout_s
        self.stall_s = stall_s
        self.retry_s = retry_s
        self._plans: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {}
        self._generation: dict[str, int] = {}
        self._alive_at: dict[str, float] = {}
        """``time.monotonic()`` of each kind's last sign of life (written by its thread)."""
        self._listed: set[str] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._pods: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._core: Any | None = None
        """CoreV1Api, for reading a newly referenced Secret (set by ``start``)."""
        self._fetching: set[str] = set()

    async def start(self) -> None:
        import importlib

        client: Any = importlib.import_module("kubernetes.client")
        config: Any = importlib.import_module("kubernetes.config")
        if self._api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api_client = client.ApiClient()
        self._loop = asyncio.get_running_loop()
        custom = client.CustomObjectsApi(self._api_client)
        core = client.CoreV1Api(self._api_client)
        self._core = core
        ns = self.namespace
        plans: list[tuple[str, Callable[..., Any], dict[str, Any]]] = [
            ("inferencepools", custom.list_namespaced_custom_object if ns
             else custom.list_cluster_custom_object,
             {"group": GROUP, "version": VERSION, "plural": "inferencepools",
              **({"namespace": ns} if ns else {})}),
            ("routepolicies", custom.list_namespaced_custom_object if ns
             else custom.list_cluster_custom_object,
             {"group": GROUP, "version": VERSION, "plural": "routepolicies",
              **({"namespace": ns} if ns else {})}),
            ("cachetiers", custom.list_namespaced_custom_object if ns
             else custom.list_cluster_custom_object,
             {"group": GROUP, "version": VERSION, "plural": "cachetiers",
              **({"namespace": ns} if ns else {})}),
            ("pods", core.list_namespaced_pod if ns else core.list_pod_for_all_namespaces,
             {"namespace": ns} if ns else {}),
        ]
        for kind, lister, kwargs in plans:
            self._plans[kind] = (lister, kwargs)
            self._start_watch(kind)
        self._watchdog = self._loop.create_task(self._watch_dog(), name="kube-watchdog")
        thread = threading.Thread(target=self._refresh_secrets_forever, name="read-secrets",
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    def _refresh_secrets_forever(self) -> None:
        """Re-read every named Secret by name (no list, no watch of Secrets)."""
        while not self._stop.wait(SECRET_REFRESH_S):
            self._post(self._refresh_secrets)

    def _refresh_secrets(self) -> None:
        for key in self._secret_refs():
            if key not in self._fetching:
                self._fetch_secret(key)

    async def stop(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            await cancel_and_wait([self._watchdog], what="kube watchdog")
            self._watchdog = None

    def _start_watch(self, kind: str) -> None:
        generation = self._generation.get(kind, 0) + 1
        self._generation[kind] = generation
        self._alive_at[kind] = time.monotonic()
        lister, kwargs = self._plans[kind]
        thread = threading.Thread(target=self._watch, args=(kind, lister, kwargs, generation),
                                  name=f"watch-{kind}-{generation}", daemon=True)
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    async def _watch_dog(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(min(5.0, self.stall_s / 4))
            now = time.monotonic()
            for kind in list(self._plans):
                silent = now - self._alive_at.get(kind, now)
                if silent > self.stall_s:
                    log.warning("watch of %s silent for %.0f s (stalled connection?); "
                                "starting a new list and watch", kind, silent)
                    self._start_watch(kind)

    def _current(self, kind: str, generation: int) -> bool:
        return not self._stop.is_set() and self._generation.get(kind) == generation

    def _watch(self, kind: str, lister: Callable[..., Any], kwargs: dict[str, Any],
               generation: int) -> None:
        import importlib
        import json

        watch: Any = importlib.import_module("kubernetes.watch")
        timeout = (CONNECT_TIMEOUT_S, self.read_timeout_s)
        while self._current(kind, generation):
            try:
                listing = lister(**kwargs, _preload_content=False, _request_timeout=timeout)
                body = json.loads(listing.data)
                items = body.get("items") or []
                self._alive_at[kind] = time.monotonic()
                self._post(self._relist, kind, items, generation)
                version = (body.get("metadata") or {}).get("resourceVersion")
                stream = watch.Watch()
                for event in stream.stream(lister, **kwargs, resource_version=version,
                                           timeout_seconds=self.watch_timeout_s,
                                           _request_timeout=timeout):
                    if not self._current(kind, generation):
                        stream.stop()
                        return
                    self._alive_at[kind] = time.monotonic()
                    obj = event["object"]
                    if not isinstance(obj, dict):
                        assert self._api_client is not None
                        obj = self._api_client.sanitize_for_serialization(obj)
                    self._post(self._event, kind, event["type"], obj, generation)
                self._alive_at[kind] = time.monotonic()
            except Exception as exc:
                if not self._current(kind, generation):
                    return
                log.warning("watch of %s failed, re-listing in %.0f s: %s", kind, self.retry_s,
                            exc)
                self._stop.wait(self.retry_s)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # loop closed at shutdown
            self._loop.call_soon_threadsafe(fn, *args)

    # ---- applied on the event loop ------------------------------------------------------
    def _relist(self, kind: str, items: list[dict[str, Any]],
                generation: int | None = None) -> None:
        if generation is not None and self._generation.get(kind) != generation:
            return  # from a watch the watchdog replaced
        self._apply_listing(kind, items)
        self._listed.add(kind)
        if self._listed >= LISTED_FOR_READY:
            self.datastore.loaded = True

    def _apply_listing(self, kind: str, items: list[dict[str, Any]]) -> None:
        if kind == "secrets":
            seen = set()
            for item in items:
                seen.add(self._apply_secret(item))
            for key in self.datastore.api_key_secrets() + self.datastore.value_secrets():
                if key not in seen:
                    self._forget_secret(key)
            return
        if kind == "pods":
            self._pods = {object_key(p["metadata"].get("namespace"), p["metadata"]["name"]): p
                          for p in items}
            self._refresh_endpoints()
            return
        keys = set()
        for item in items:
            keys.add(self._apply(kind, "ADDED", item))
        existing = ([s.key for s in self.datastore.pools()] if kind == "inferencepools"
                    else self.datastore.cache_tier_keys() if kind == "cachetiers"
                    else list(self.datastore.policies()))
        for key in existing:
            if key not in keys:
                self._delete(kind, key)
        if kind in ("routepolicies", "cachetiers"):
            self._follow_secret_refs()

    def _event(self, kind: str, event_type: str, obj: dict[str, Any],
               generation: int | None = None) -> None:
        if generation is not None and self._generation.get(kind) != generation:
            return  # from a watch the watchdog replaced
        if kind == "secrets":
            meta = obj.get("metadata") or {}
            if event_type == "DELETED":
                self._forget_secret(object_key(meta.get("namespace"), meta.get("name", "")))
            else:
                self._apply_secret(obj)
            return
        if kind == "pods":
            key = object_key(obj["metadata"].get("namespace"), obj["metadata"]["name"])
            if event_type == "DELETED":
                self._pods.pop(key, None)
            else:
                self._pods[key] = obj
            self._refresh_endpoints()
        elif event_type == "DELETED":
            meta = obj.get("metadata") or {}
            self._delete(kind, object_key(meta.get("namespace"), meta.get("name", "")))
        else:
            self._apply(kind, event_type, obj)
        if kind in ("routepolicies", "cachetiers"):
            self._follow_secret_refs()

    def _apply(self, kind: str, event_type: str, obj: dict[str, Any]) -> str:
        meta = obj.get("metadata") or {}
        key = object_key(meta.get("namespace"), meta.get("name", ""))
        body = {k: v for k, v in obj.items() if k != "kind"}
        try:
            if kind == "inferencepools":
                pool = InferencePool.model_validate(body, by_alias=True)
                static = bool(pool.spec.endpoints)
                self.datastore.set_pool(pool, None if static else self._pool_pods(pool))
            elif kind == "cachetiers":
                self.datastore.set_cache_tier(CacheTier.model_validate(body, by_alias=True))
            else:
                self.datastore.set_policy(RoutePolicy.model_validate(body, by_alias=True))
        except ValidationError as exc:
            log.warning("ignoring invalid %s %s: %s", kind, key, exc)
        return key

    def _delete(self, kind: str, key: str) -> None:
        if kind == "inferencepools":
            self.datastore.delete_pool(key)
        elif kind == "cachetiers":
            self.datastore.delete_cache_tier(key)
        else:
            self.datastore.delete_policy(key)

    # ---- API-key Secrets ----------------------------------------------------------------
    def _api_key_refs(self) -> set[str]:
        """``namespace/name`` of every Secret a policy names as its API keys."""
        refs = set()
        for policy in self.datastore.policies().values():
            ref = policy.spec.tenancy.api_keys_secret_ref
            if ref is not None:
                refs.add(object_key(policy.metadata.namespace, ref.name))
        return refs

    def _value_refs(self) -> dict[str, set[str]]:
        """``namespace/name`` → data keys of every Secret a CacheTier names
        (``spec.response.redis.urlSecretRef``, in the tier's namespace)."""
        refs: dict[str, set[str]] = {}
        for tier_key in self.datastore.cache_tier_keys():
            tier = self.datastore.cache_tier(tier_key)
            response = tier.spec.response if tier is not None else None
            ref = (response.redis.url_secret_ref
                   if response is not None and response.redis is not None else None)
            if tier is not None and ref is not None:
                key = object_key(tier.metadata.namespace, ref.name)
                refs.setdefault(key, set()).add(ref.key)
        return refs

    def _secret_refs(self) -> set[str]:
        """Every Secret the router reads (by name): API keys and CacheTier URLs."""
        return self._api_key_refs() | set(self._value_refs())

    def _forget_secret(self, key: str) -> None:
        self.datastore.delete_api_keys(key)
        self.datastore.delete_secret_values(key)

    def _apply_secret(self, obj: dict[str, Any]) -> str:
        """Hash a referenced Secret's keys into the datastore, keep the data keys CacheTiers
        name; ignore any other Secret."""
        meta = obj.get("metadata") or {}
        key = object_key(meta.get("namespace"), meta.get("name", ""))
        if key in self._api_key_refs():
            self.datastore.set_api_keys(key, digests_of_secret(obj))
        else:
            self.datastore.delete_api_keys(key)
        wanted = self._value_refs().get(key)
        if wanted:
            data = secret_strings(obj)
            self.datastore.set_secret_values(key, {k: data[k].strip() for k in wanted
                                                   if k in data})
        else:
            self.datastore.delete_secret_values(key)
        return key

    def _follow_secret_refs(self) -> None:
        """After a policy or CacheTier change: forget Secrets nothing names, read newly
        named ones."""
        api_refs, value_refs = self._api_key_refs(), self._value_refs()
        for key in self.datastore.api_key_secrets():
            if key not in api_refs:
                self.datastore.delete_api_keys(key)
        known_values = set(self.datastore.value_secrets())
        for key in known_values - set(value_refs):
            self.datastore.delete_secret_values(key)
        for key in api_refs | set(value_refs):
            if key in self._fetching:
                continue
            if ((key in api_refs and self.datastore.api_keys(key) is None)
                    or (key in value_refs and (key not in known_values or any(
                        self.datastore.secret_value(key, k) is None
                        for k in value_refs[key])))):
                self._fetch_secret(key)

    def _fetch_secret(self, key: str) -> None:
        if self._core is None or self._loop is None:
            return  # not started (tests feed Secrets as events)
        core = self._core
        namespace, _, name = key.partition("/")
        self._fetching.add(key)

        def read() -> None:
            import json

            try:
                response = core.read_namespaced_secret(name, namespace, _preload_content=False)
                obj = json.loads(response.data)
            except Exception as exc:
                status = getattr(exc, "status", None)
                log.warning("cannot read Secret %s (status %s); until it can be read, an "
                            "API-key policy's requests are its default tenant and a CacheTier "
                            "whose redis.urlSecretRef names it has no response cache (the "
                            "router needs 'get' on it: router.apiKeySecrets or "
                            "router.cacheTierSecrets in the chart)", key,
                            status if status is not None else type(exc).__name__)
                self._post(self._fetching.discard, key)
                if status == 404:
                    self._post(self._forget_secret, key)
                return
            self._post(self._fetched, key, obj)

        threading.Thread(target=read, name=f"read-secret-{key}", daemon=True).start()

    def _fetched(self, key: str, obj: dict[str, Any]) -> None:
        self._fetching.discard(key)
        self._apply_secret(obj)

    def _pool_pods(self, pool: InferencePool) -> list[EndpointSpec]:
        selector = pool_selector(pool)
        if not selector:
            return []
        namespace = pool.metadata.namespace or "default"
        port = pool.spec.engine.port
        specs = []
        for pod in self._pods.values():
            meta = pod.get("metadata") or {}
            if (meta.get("namespace") or "default") != namespace:
                continue
            labels = meta.get("labels") or {}
            if any(labels.get(k) != v for k, v in selector.items()) or not pod_ready(pod):
                continue
            specs.append(EndpointSpec(name=meta["name"], address=f"{pod['status']['podIP']}:{port}",
                                      labels=labels))
        return sorted(specs, key=lambda s: s.name)

    def _refresh_endpoints(self) -> None:
        for state in self.datastore.pools():
            if not state.pool.spec.endpoints:
                self.datastore.set_pool_endpoints(state.key, self._pool_pods(state.pool))
