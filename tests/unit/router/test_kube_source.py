"""Kubernetes mode without a cluster: watch events applied to the datastore (pods matched by
the pool's selector, readiness, deletions)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from kvroute_router.datastore.kube_source import KubernetesSource, parse_selector, pod_ready
from kvroute_router.datastore.store import Datastore


def pool(name: str = "llama", selector: str | None = "app=vllm,kvroute.io/pool=llama"
         ) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": "inference", "uid": "u1"},
        "spec": {"model": {"name": "llama-8b", "source": "hf://meta/llama"},
                 "engine": {"port": 8000}},
    }
    if selector:
        body["status"] = {"selector": selector}
    return body


def pod(name: str, ip: str | None, ready: bool, labels: dict[str, str] | None = None
        ) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "inference",
                         "labels": labels or {"app": "vllm", "kvroute.io/pool": "llama"}},
            "status": {"podIP": ip, "conditions": [
                {"type": "Ready", "status": "True" if ready else "False"}]}}


def test_selector_and_readiness_helpers() -> None:
    assert parse_selector("a=b,c==d,e!=f") == {"a": "b", "c": "d"}
    assert pod_ready(pod("p", "10.0.0.1", True))
    assert not pod_ready(pod("p", None, True)) and not pod_ready(pod("p", "10.0.0.1", False))


def test_watch_events_drive_pool_endpoints() -> None:
    store = Datastore()
    source = KubernetesSource(store, namespace="inference")
    source._relist("pods", [pod("a", "10.0.0.1", True), pod("b", "10.0.0.2", False),
                            pod("c", "10.0.0.3", True, {"app": "other"})])
    source._relist("inferencepools", [pool()])
    state = store.pool("inference/llama")
    assert state is not None and [e.address for e in state.endpoints.values()] == ["10.0.0.1:8000"]
    source._event("pods", "MODIFIED", pod("b", "10.0.0.2", True))
    assert sorted(e.name for e in store.endpoints()) == ["a", "b"]
    source._event("pods", "DELETED", pod("a", "10.0.0.1", True))
    assert [e.name for e in store.endpoints()] == ["b"]
    source._relist("routepolicies", [{
        "apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
        "metadata": {"name": "chat", "namespace": "inference"},
        "spec": {"match": {"model": "chat"}, "pools": [{"name": "llama"}]}}])
    resolution = store.resolve("chat", {})
    assert resolution is not None and resolution.pools[0][0] is store.pool("inference/llama")
    source._event("inferencepools", "DELETED", pool())
    assert store.pool("inference/llama") is None
    source._event("routepolicies", "ADDED", {"metadata": {"name": "bad"}, "spec": {}})
    assert "default/bad" not in store.policies()  # invalid objects are ignored


def _keyed_policy(name: str, secret: str | None) -> dict[str, Any]:
    tenancy: dict[str, Any] = {"source": "Header"}
    if secret is not None:
        tenancy = {"source": "APIKey", "apiKeysSecretRef": {"name": secret}}
    return {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
            "metadata": {"name": name, "namespace": "inference"},
            "spec": {"match": {"model": name}, "pools": [{"name": "llama"}],
                     "tenancy": tenancy}}


def _secret(name: str, data: dict[str, str], namespace: str = "inference") -> dict[str, Any]:
    import base64

    return {"metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


class FakeCore:
    """CoreV1Api.read_namespaced_secret for a Secret named by a policy after the watch saw
    it (or before the watch lists it)."""

    def __init__(self, secrets: dict[str, dict[str, Any]]) -> None:
        self.secrets = secrets
        self.reads: list[tuple[str, str]] = []

    def read_namespaced_secret(self, name: str, namespace: str,
                               _preload_content: bool = True) -> Any:
        import json
        import types

        self.reads.append((namespace, name))
        return types.SimpleNamespace(data=json.dumps(self.secrets[name]).encode())


async def test_api_key_secrets_are_followed_hashed_and_scoped() -> None:
    import asyncio

    from kvroute_router.datastore.api_keys import api_key_digest

    store = Datastore()
    source = KubernetesSource(store, namespace="inference")
    source._loop = asyncio.get_running_loop()
    keys = _secret("keys", {"alice": "key-a", "bob": "key-b1\nkey-b2\n"})
    core = FakeCore({"keys": keys,
                     "late": {"metadata": {"name": "late", "namespace": "inference"},
                              "stringData": {"carol": "key-c"}}})
    source._core = core
    # Secrets are listed before any policy names them: nothing is kept.
    source._relist("secrets", [keys, _secret("unrelated", {"password": "hunter2"})])
    assert store.api_key_secrets() == []
    source._relist("routepolicies", [_keyed_policy("chat", "keys"), _keyed_policy("plain", None)])
    # Named now, but the watch already passed it: the source reads it (in a thread).
    for _ in range(100):
        if store.api_keys("inference/keys") is not None:
            break
        await asyncio.sleep(0.01)
    assert core.reads == [("inference", "keys")]
    table = store.api_keys("inference/keys")
    assert table == {api_key_digest("key-a"): "alice", api_key_digest("key-b1"): "bob",
                     api_key_digest("key-b2"): "bob"}
    assert "key-a" not in repr(store._api_keys) and "hunter2" not in repr(store._api_keys)
    # Other Secrets, and Secrets of the same name in another namespace, are ignored.
    source._event("secrets", "ADDED", _secret("keys", {"mallory": "key-m"}, namespace="other"))
    source._event("secrets", "ADDED", _secret("unrelated", {"x": "y"}))
    assert store.api_key_secrets() == ["inference/keys"]
    # A rotated key applies; the datastore version moves so the budget hook rebuilds.
    version = store.version
    source._event("secrets", "MODIFIED", _secret("keys", {"alice": "key-a2"}))
    assert store.version > version
    assert store.api_keys("inference/keys") == {api_key_digest("key-a2"): "alice"}
    # A policy naming a Secret the watch has not delivered: read through the API.
    source._event("routepolicies", "ADDED", _keyed_policy("late", "late"))
    for _ in range(100):
        if store.api_keys("inference/late") is not None:
            break
        await asyncio.sleep(0.01)
    assert store.api_keys("inference/late") == {api_key_digest("key-c"): "carol"}
    # The Secret is deleted, then no policy names it any more: forgotten.
    source._event("secrets", "DELETED", _secret("keys", {}))
    assert store.api_keys("inference/keys") is None
    source._event("routepolicies", "DELETED", _keyed_policy("late", "late"))
    assert store.api_keys("inference/late") is None


async def test_unreadable_secret_logs_its_name_but_never_a_key(caplog: Any) -> None:
    import asyncio

    store = Datastore()
    source = KubernetesSource(store, namespace="inference")
    source._loop = asyncio.get_running_loop()
    source._core = FakeCore({})  # KeyError on read: "not found"
    source._event("secrets", "ADDED", _secret("keys", {"alice": "sekrit-key"}))
    with caplog.at_level("DEBUG"):
        source._relist("routepolicies", [_keyed_policy("chat", "keys")])
        for _ in range(100):
            if not source._fetching:
                break
            await asyncio.sleep(0.01)
        source._event("secrets", "MODIFIED", _secret("keys", {"alice": "sekrit-key"}))
    assert "inference/keys" in caplog.text
    assert "sekrit" not in caplog.text
    assert store.api_keys("inference/keys") is not None


# -- fault tolerance (issue 16) --------------------------------------------------------------
def test_the_datastore_is_loaded_only_once_pools_policies_and_pods_are_listed() -> None:
    # The router's readiness: pools and policies without pods would route to no endpoint.
    store = Datastore()
    source = KubernetesSource(store, namespace="inference")
    source._relist("inferencepools", [pool()])
    source._relist("routepolicies", [])
    assert not store.loaded
    source._relist("secrets", [])
    assert not store.loaded
    source._relist("pods", [pod("a", "10.0.0.1", True)])
    assert store.loaded


class StallingApiServer:
    """A loopback Kubernetes API that answers lists and never answers a watch (a half-open
    connection: the request went out, nothing ever comes back)."""

    def __init__(self) -> None:
        self.pods = [pod("a", "10.0.0.1", True)]
        self.lists: dict[str, int] = {}
        self.port = 0
        self._runner: Any = None
        self._forever: asyncio.Event | None = None

    async def __aenter__(self) -> StallingApiServer:
        from aiohttp import web

        self._forever = asyncio.Event()

        async def handle(request: web.Request) -> web.StreamResponse:
            if request.query.get("watch") in ("true", "True", "1"):
                assert self._forever is not None
                await self._forever.wait()  # never set: the watch hangs
            plural = request.path.rstrip("/").rsplit("/", 1)[-1]
            self.lists[plural] = self.lists.get(plural, 0) + 1
            items = {"inferencepools": [pool()], "pods": self.pods}.get(plural, [])
            return web.json_response({"kind": "List", "apiVersion": "v1", "items": items,
                                      "metadata": {"resourceVersion": "1"}})

        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()

    def client(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{self.port}"
        return client.ApiClient(configuration)


async def _until(condition: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("guard", ["read_timeout", "watchdog"])
async def test_a_stalled_watch_is_replaced_and_endpoints_catch_up(guard: str) -> None:
    # read_timeout: the client-side read timeout ends the hung watch; watchdog: with a read
    # timeout too long to help, the watchdog starts a new list and watch.
    settings = ({"read_timeout_s": 1.0, "stall_s": 600.0} if guard == "read_timeout"
                else {"read_timeout_s": 600.0, "stall_s": 1.0})
    async with StallingApiServer() as api:
        store = Datastore()
        source = KubernetesSource(store, namespace="inference", api_client=api.client(),
                                  watch_timeout_s=600, retry_s=0.1, **settings)
        await source.start()
        try:
            await _until(lambda: store.loaded, "the first listing")
            assert [e.name for e in store.endpoints()] == ["a"]
            api.pods = [pod("a", "10.0.0.1", True), pod("b", "10.0.0.2", True)]  # missed
            await _until(lambda: sorted(e.name for e in store.endpoints()) == ["a", "b"],
                         "the endpoints to catch up after the stalled watch")
            assert api.lists["pods"] >= 2
        finally:
            await source.stop()
class _NotFoundError(Exception):
    status = 404


class SecretReadingCore(FakeCore):
    """A core API whose missing Secrets answer 404 (and are recorded as read)."""

    def read_namespaced_secret(self, name: str, namespace: str,
                               _preload_content: bool = True) -> Any:
        if name not in self.secrets:
            self.reads.append((namespace, name))
            raise _NotFoundError()
        return super().read_namespaced_secret(name, namespace, _preload_content)


async def settled(source: KubernetesSource, check: Any) -> None:
    """Until ``check()`` holds and no Secret read is in flight (reads run in threads)."""
    for _ in range(200):
        if check() and not source._fetching:
            return
        await asyncio.sleep(0.01)


async def test_named_secrets_are_re_read_by_name_and_a_deleted_one_is_forgotten() -> None:
    """No Secret list or watch (least privilege): rotations arrive by re-reading each named
    Secret; a 404 forgets it."""
    import asyncio

    from kvroute_router.datastore.api_keys import api_key_digest

    store = Datastore()
    source = KubernetesSource(store, namespace="inference")
    source._loop = asyncio.get_running_loop()
    core = SecretReadingCore({"keys": _secret("keys", {"alice": "key-a"})})
    source._core = core
    source._relist("routepolicies", [_keyed_policy("chat", "keys")])
    await settled(source, lambda: store.api_keys("inference/keys") is not None)
    core.secrets["keys"] = _secret("keys", {"alice": "key-a2"})  # rotated
    source._refresh_secrets()
    rotated = {api_key_digest("key-a2"): "alice"}
    await settled(source, lambda: store.api_keys("inference/keys") == rotated)
    assert store.api_keys("inference/keys") == {api_key_digest("key-a2"): "alice"}
    del core.secrets["keys"]
    source._refresh_secrets()
    await settled(source, lambda: store.api_keys("inference/keys") is None)
    assert store.api_keys("inference/keys") is None
    assert set(core.reads) == {("inference", "keys")}  # only the named Secret, by name


def _redis_tier(name: str, secret: str, key: str = "url") -> dict[str, Any]:
    return {"apiVersion": "kvroute.io/v1alpha1", "kind": "CacheTier",
            "metadata": {"name": name, "namespace": "inference"},
            "spec": {"response": {"backend": "redis",
                                  "redis": {"urlSecretRef": {"name": secret, "key": key}}}}}


async def test_cache_tier_url_secrets_are_read_by_name_and_only_the_named_key_is_kept() -> None:
    """CacheTier.spec.response.redis.urlSecretRef: the Secret the tier names is read by name in
    the tier's namespace (no list, no watch), re-read for rotations, forgotten when gone."""
    import asyncio

    store = Datastore()
    source = KubernetesSource(store, namespace="inference")
    source._loop = asyncio.get_running_loop()
    core = SecretReadingCore({"redis": _secret("redis", {"url": "redis://:pw@redis:6379/0",
                                            "other": "not-kept"})})
    source._core = core
    source._relist("cachetiers", [_redis_tier("answers", "redis")])
    await settled(source, lambda: store.secret_value("inference/redis", "url") is not None)
    assert store.secret_value("inference/redis", "url") == "redis://:pw@redis:6379/0"
    assert "not-kept" not in repr(store._secret_values)
    assert store.api_keys("inference/redis") is None  # not an API-key Secret
    core.secrets["redis"] = _secret("redis", {"url": "redis://:pw2@redis:6379/0"})  # rotated
    source._refresh_secrets()
    await settled(source, lambda: store.secret_value("inference/redis", "url")
                == "redis://:pw2@redis:6379/0")
    assert store.secret_value("inference/redis", "url") == "redis://:pw2@redis:6379/0"
    # A Secret no tier names is ignored; a tier deleted: its Secret forgotten.
    source._event("secrets", "ADDED", _secret("unrelated", {"url": "redis://x"}))
    assert store.value_secrets() == ["inference/redis"]
    source._event("cachetiers", "DELETED", _redis_tier("answers", "redis"))
    assert store.value_secrets() == []
    # Named again, then deleted in the cluster (404): forgotten.
    source._event("cachetiers", "ADDED", _redis_tier("answers", "redis"))
    await settled(source, lambda: store.secret_value("inference/redis", "url") is not None)
    del core.secrets["redis"]
    source._refresh_secrets()
    await settled(source, lambda: store.secret_value("inference/redis", "url") is None)
    assert store.secret_value("inference/redis", "url") is None
    assert set(core.reads) == {("inference", "redis")}  # only the named Secret, by name
