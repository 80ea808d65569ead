"""How many router replicas share the budgets: the ready endpoints of the router's own Service.

Without a shared meter store (Redis) every replica keeps its own meters, so each must enforce
only its share of every limit: ``1 / ready replicas`` (docs/security.md, "Several replicas").
:class:`PeerCount` lists the Service's EndpointSlices (label ``kubernetes.io/service-name``)
every ``interval_s`` in a worker thread and reports the count of distinct ready, non-terminating
endpoints — counting this pod too while it is not ready yet (it is about to take traffic) — to
``on_change`` on the event loop whenever it changes. When the slices cannot be read (no RBAC,
no cluster) the last count stays and a warning says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

SERVICE_LABEL = "kubernetes.io/service-name"


def ready_replicas(slices: Iterable[Mapping[str, Any]], self_name: str | None) -> int:
    """Distinct ready, non-terminating endpoints of the slices (by target pod name, else
    address), plus this pod when it is not among them; at least 1."""
    ready: set[str] = set()
    for piece in slices:
        for endpoint in piece.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            # EndpointSlice API: an unset ``ready`` means ready.
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            target = (endpoint.get("targetRef") or {}).get("name")
            addresses = endpoint.get("addresses") or []
            name = target or (addresses[0] if addresses else None)
            if name:
                ready.add(name)
    if self_name and self_name not in ready:
        ready.add(self_name)
    return max(1, len(ready))


class PeerCount:
    """Follows the ready replica count of one Service."""

    def __init__(self, namespace: str, service: str, self_name: str | None,
                 on_change: Callable[[int], None], *, interval_s: float = 10.0,
                 lister: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.namespace = namespace
        self.service = service
        self.self_name = self_name
        self.on_change = on_change
        self.interval_s = interval_s
        self.count: int | None = None
        self._lister = lister
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._warned = False

    def _kube_lister(self) -> Callable[[], list[dict[str, Any]]]:
        import importlib

        client: Any = importlib.import_module("kubernetes.client")
        config: Any = importlib.import_module("kubernetes.config")
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.DiscoveryV1Api(client.ApiClient())

        def lister() -> list[dict[str, Any]]:
            response = api.list_namespaced_endpoint_slice(
                self.namespace, label_selector=f"{SERVICE_LABEL}={self.service}",
                _preload_content=False)
            items: list[dict[str, Any]] = json.loads(response.data).get("items") or []
            return items

        return lister

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._lister is None:
            self._lister = self._kube_lister()
        self._apply(await asyncio.to_thread(self.measure))
        self._thread = threading.Thread(target=self._run, name="peer-count", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            count = self.measure()
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                self._loop.call_soon_threadsafe(self._apply, count)

    def measure(self) -> int | None:
        """The ready replica count now (blocking), None when it cannot be read."""
        assert self._lister is not None
        try:
            count = ready_replicas(self._lister(), self.self_name)
        except Exception as exc:
            if not self._warned:
                log.warning("cannot count router replicas from the EndpointSlices of Service "
                            "%s/%s (%s); budgets keep the share of %s replica(s)",
                            self.namespace, self.service, getattr(exc, "status", None) or exc,
                            self.count or 1)
                self._warned = True
            return None
        self._warned = False
        return count

    def _apply(self, count: int | None) -> None:
        if count is not None and count != self.count:
            self.count = count
            self.on_change(count)


__all__ = ["PeerCount", "ready_replicas"]
