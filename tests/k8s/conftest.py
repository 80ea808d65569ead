"""Fixtures: the extended kmock emulator on loopback, and a real kopf operator (the same
handlers as production) running as a task in the test's event loop against it."""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest
import pytest_asyncio
import yaml
from kmock._internal import apps
from kvroute_api import GROUP, VERSION
from kvroute_operator.context import OperatorConfig
from kvroute_operator.kube import KubeConnection
from kvroute_operator.runner import build_registry

from tests.k8s.emulator import OperatorTestEmulator, declare_resources

NAMESPACE = "inference"
WAIT_SECONDS = 20.0
RESYNC_SECONDS = 0.5


def load_example(examples_dir: Path, name: str) -> dict[str, Any]:
    body = yaml.safe_load((examples_dir / name).read_text(encoding="utf-8"))
    assert isinstance(body, dict)
    return body


async def eventually(check: Callable[[], Any], what: str) -> Any:
    """Poll ``check`` until it returns a truthy value (or raise naming ``what``), bounded by
    WAIT_SECONDS."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            last = check()
        except (KeyError, IndexError, TypeError, AssertionError):
            last = None
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Cluster:
    """Test-side access to the emulator's objects (the cluster's state)."""

    def __init__(self, emulator: OperatorTestEmulator, server: apps.Server) -> None:
        self.emulator = emulator
        self.server = server
        self.url = str(server.url).rstrip("/")

    @staticmethod
    def resource(api_version: str, plural: str) -> kmock.resource:
        group, _, version = api_version.rpartition("/")
        return kmock.resource(group=group, version=version, plural=plural)

    def get(self, api_version: str, plural: str, name: str,
            namespace: str = NAMESPACE) -> Any:
        """The stored object, None when absent. Typed ``Any`` so that ``eventually`` checks can
        index it directly: indexing None raises TypeError, which ``eventually`` retries."""
        key = (self.resource(api_version, plural), namespace, name)
        if key not in self.emulator.objects or self.emulator.objects[key].deleted:
            return None
        return copy.deepcopy(dict(self.emulator.objects[key].raw))

    def names(self, api_version: str, plural: str, namespace: str = NAMESPACE) -> list[str]:
        res = self.resource(api_version, plural)
        return sorted(name for (r, ns, name), obj in self.emulator.objects.items()
                      if r == res and ns == namespace and not obj.deleted)

    async def call(self, method: str, path: str, body: Any = None,
                   content_type: str = "application/merge-patch+json") -> dict[str, Any]:
        async with self.server.client.request(
                method, path, json=body, headers={"Content-Type": content_type}) as resp:
            data = await resp.json(content_type=None)
            assert resp.status < 400, (resp.status, data)
            return data if isinstance(data, dict) else {}

    def path(self, api_version: str, plural: str, name: str | None = None,
             namespace: str = NAMESPACE, subresource: str | None = None) -> str:
        base = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
        path = f"{base}/namespaces/{namespace}/{plural}"
        return path + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        api_version = body["apiVersion"]
        plural = {"InferencePool": "inferencepools", "RoutePolicy": "routepolicies",
                  "CacheTier": "cachetiers", "Pod": "pods"}[body["kind"]]
        body = copy.deepcopy(body)
        body["metadata"]["namespace"] = NAMESPACE
        return await self.call("POST", self.path(api_version, plural), body,
                               "application/json")

    async def patch(self, api_version: str, plural: str, name: str, body: dict[str, Any],
                    subresource: str | None = None) -> dict[str, Any]:
        return await self.call("PATCH", self.path(api_version, plural, name,
                                                  subresource=subresource), body)

    def patch_stored(self, api_version: str, plural: str, name: str,
                     spec: dict[str, Any]) -> None:
        """Change a stored object's spec directly, as if edited while no operator watches
        (kmock's event bus waits for its watchers to drain, and a stopped operator's closed
        watch streams never do, so the HTTP path is not used here)."""
        obj = self.emulator.objects[(self.resource(api_version, plural), NAMESPACE, name)]
        generation = (obj.raw.get("metadata") or {}).get("generation", 1)
        obj.patch({"spec": spec, "metadata": {"generation": generation + 1}})

    async def delete(self, api_version: str, plural: str, name: str) -> None:
        await self.call("DELETE", self.path(api_version, plural, name), None,
                        "application/json")

    def pool(self, name: str) -> Any:
        return self.get(f"{GROUP}/{VERSION}", "inferencepools", name)

    def policy(self, name: str) -> Any:
        return self.get(f"{GROUP}/{VERSION}", "routepolicies", name)

    def tier(self, name: str) -> Any:
        return self.get(f"{GROUP}/{VERSION}", "cachetiers", name)


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


@pytest_asyncio.fixture()
async def cluster() -> AsyncIterator[Cluster]:
    emulator = OperatorTestEmulator()
    declare_resources(emulator)
    async with emulator, apps.Server(emulator) as server:
        yield Cluster(emulator, server)


OperatorStopper = Callable[[], Awaitable[None]]
OperatorStarter = Callable[[], Awaitable[OperatorStopper]]


@pytest_asyncio.fixture()
async def operator(cluster: Cluster) -> AsyncIterator[OperatorStarter]:
    """Start (and stop) real kopf operators against the emulator; returns a starter whose
    result stops that operator. Every operator left running is stopped at teardown.

    Each operator runs in its own thread and event loop, as kopf recommends for embedding: at
    shutdown kopf cancels every task of its loop created after it started, so sharing the
    test's loop would cancel the very task waiting for the shutdown. A shutdown that does not
    finish within ``WAIT_SECONDS`` fails the test."""
    running: list[OperatorThread] = []

    async def start() -> OperatorStopper:
        config = OperatorConfig(resync_seconds=RESYNC_SECONDS,
                                connection=KubeConnection(server=cluster.url))
        registry = build_registry(config, login=False)

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=cluster.url, insecure=True)

        entry = OperatorThread(registry, config)
        running.append(entry)
        entry.start()
        if not await asyncio.to_thread(entry.ready.wait, WAIT_SECONDS):
            pytest.fail(f"the operator was not ready within {WAIT_SECONDS} s")

        async def stop() -> None:
            running.remove(entry)
            await entry.stop()

        return stop

    yield start
    for entry in list(running):
        await entry.stop()


class OperatorThread:
    """One kopf operator on its own event loop in a daemon thread."""

    def __init__(self, registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
        self.registry, self.config = registry, config
        self.ready, self.stop_flag = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kopf-operator", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            asyncio.run(kopf.operator(
                registry=self.registry, standalone=True, clusterwide=True,
                memo=kopf.Memo(config=self.config), stop_flag=self.stop_flag,
                ready_flag=self.ready))
        except BaseException as exc:  # reported by stop()
            self.error = exc

    async def stop(self) -> None:
        """Set the stop flag and require the operator to finish within the bound; an error
        it raised is raised here."""
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, WAIT_SECONDS)
        if self.thread.is_alive():
            pytest.fail(f"the operator did not stop within {WAIT_SECONDS} s of its stop flag")
        if self.error is not None:
            raise self.error


@pytest.fixture()
def pool_8b(examples_dir: Path) -> dict[str, Any]:
    return load_example(examples_dir, "pool-llama-8b.yaml")


@pytest.fixture()
def tier(examples_dir: Path) -> dict[str, Any]:
    return load_example(examples_dir, "cachetier.yaml")


@pytest.fixture()
def policy(examples_dir: Path) -> dict[str, Any]:
    return load_example(examples_dir, "routepolicy-two-pools.yaml")
