"""kmock's KubernetesEmulator extended with what the operator's lifecycle tests need:
server-side apply creating missing objects, metadata.generation bumped on spec changes,
resourceVersion/uid/creationTimestamp, the scale subresource of InferencePools, and equality
label selectors on lists. The CRDs and core resources are declared for kopf's discovery."""

from __future__ import annotations

import copy
import datetime
import itertools
import uuid
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import enums, rendering
from kvroute_api import GROUP, VERSION

APPLY = "application/apply-patch+yaml"
KVROUTE_KINDS = {"inferencepools": "InferencePool", "routepolicies": "RoutePolicy",
                 "cachetiers": "CacheTier"}


def declare_resources(emulator: kmock.KubernetesEmulator) -> None:
    info = kmock.ResourceInfo
    emulator.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False,
                                               verbs={"list", "watch", "get"})
    for plural, kind in (("pods", "Pod"), ("services", "Service"), ("events", "Event")):
        emulator.resources[f"v1/{plural}"] = info(
            kind=kind, namespaced=True,
            verbs={"list", "watch", "get", "create", "patch", "delete"})
    emulator.resources["apps/v1/deployments"] = info(
        kind="Deployment", namespaced=True, subresources={"status", "scale"},
        verbs={"list", "watch", "get", "create", "patch", "delete"})
    emulator.resources["policy/v1/poddisruptionbudgets"] = info(
        kind="PodDisruptionBudget", namespaced=True,
        verbs={"list", "watch", "get", "create", "patch", "delete"})
    for plural, kind in KVROUTE_KINDS.items():
        emulator.resources[f"{GROUP}/{VERSION}/{plural}"] = info(
            kind=kind, namespaced=True,
            subresources={"status", "scale"} if plural == "inferencepools" else {"status"},
            verbs={"list", "watch", "get", "create", "patch", "update", "delete"})


def _matches(obj: dict[str, Any], selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip().lstrip("="):
            return False
    return True


@attrs.define(kw_only=True)
class OperatorTestEmulator(kmock.KubernetesEmulator):
    """The emulator with the API-server behaviours the operator relies on."""

    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)

    def _key(self, request: rendering.Request) -> Any:
        return (request.resource, request.namespace, request.name)

    def _stamp_server_fields(self, request: rendering.Request) -> None:
        """Fill in server-set metadata in the request body before the base class stores it."""
        data = request.data if isinstance(request.data, dict) else None
        if data is None or request.resource is None:
            return
        meta = data.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self._versions))
        key = self._key(request)
        existing = self._objects[key] if request.action == enums.action.UPDATE \
            and key in self._objects else None
        if request.action == enums.action.CREATE or existing is None or existing.deleted:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC)
                            .strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta["generation"] = 1
            return
        old = existing.raw
        if request.subresource is None and "spec" in data:
            merged = copy.deepcopy(old.get("spec") or {})
            merged.update(data["spec"]) if not isinstance(data["spec"], dict) else \
                _deep_merge(merged, data["spec"])
            generation = (old.get("metadata") or {}).get("generation", 1)
            meta["generation"] = generation + 1 if merged != old.get("spec") else generation

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.action == enums.action.UPDATE:
            # The scale subresource of InferencePools writes spec.replicas.
            if request.subresource == "scale" and request.resource.plural == "inferencepools":
                return await self._scale(request)
            if isinstance(request.data, list):
                return await self._json_patch(request)
            # Server-side apply creates what does not exist yet.
            is_apply = request.headers.get("Content-Type", "").startswith(APPLY)
            key = self._key(request)
            if is_apply and (key not in self._objects or self._objects[key].deleted):
                self._stamp_server_fields(attrs.evolve(request, action=enums.action.CREATE))
                async with self._lock:
                    if key in self._objects:
                        self._objects[key].create(request.data)
                    else:
                        self._objects[key] = request.data
                    raw = self._objects[key].raw
                    await self._buses[request.resource].put({"type": "ADDED", "object": raw})
                return aiohttp.web.json_response(raw)
        if request.resource is not None and request.action in (enums.action.CREATE,
                                                               enums.action.UPDATE):
            self._stamp_server_fields(request)
        if request.resource is not None and request.action == enums.action.LIST:
            selector = request.params.get("labelSelector")
            if selector:
                response = await super()._handle(request)
                body = rendering_json(response)
                body["items"] = [i for i in body.get("items", []) if _matches(i, selector)]
                return aiohttp.web.json_response(body)
        return await super()._handle(request)


    async def _scale(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """PATCH .../inferencepools/NAME/scale: spec.replicas of the pool (new generation)."""
        replicas = ((request.data or {}).get("spec") or {}).get("replicas")
        key = self._key(request)
        async with self._lock:
            obj = self._objects[key]
            meta = obj.raw.get("metadata") or {}
            obj.patch({"spec": {"replicas": replicas},
                       "metadata": {"generation": meta.get("generation", 1) + 1,
                                    "resourceVersion": str(next(self._versions))}})
            raw = obj.raw
            assert request.resource is not None
            await self._buses[request.resource].put({"type": "MODIFIED", "object": raw})
        return aiohttp.web.json_response({
            "apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {"name": request.name, "namespace": request.namespace},
            "spec": {"replicas": replicas},
            "status": {"replicas": (raw.get("status") or {}).get("replicas", 0),
                       "selector": (raw.get("status") or {}).get("selector", "")}})


    async def _json_patch(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """RFC 6902 patches (kopf uses them for finalizers, guarded by a resourceVersion test),
        turned into the base class's recursive merge."""
        key = self._key(request)
        assert request.resource is not None and isinstance(request.data, list)
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                raise kmock.KubernetesObjectNotFoundError()
            obj = self._objects[key]
            current = copy.deepcopy(dict(obj.raw))
            merge: dict[str, Any] = {}
            for op in request.data:
                parts = [p.replace("~1", "/").replace("~0", "~")
                         for p in op["path"].split("/")[1:]]
                old = _lookup(current, parts)
                if op["op"] == "test":
                    if old != op["value"]:
                        # What kube-apiserver answers to a failed "test" operation.
                        return aiohttp.web.json_response(
                            {"kind": "Status", "code": 422, "reason": "Invalid",
                             "message": f"the test operation failed at {op['path']}"},
                            status=422)
                    continue
                value = op.get("value")
                if op["op"] == "remove":
                    value = [] if isinstance(old, list) else {} if isinstance(old, dict) else None
                _set(merge, parts, value)
            merge.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
            obj.patch(merge)
            raw = obj.raw
            await self._buses[request.resource].put({"type": "MODIFIED", "object": raw})
            meta = raw.get("metadata") or {}
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                obj.delete()
                await self._buses[request.resource].put({"type": "DELETED", "object": raw})
        return aiohttp.web.json_response(raw)


def _lookup(obj: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


def _set(target: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def _deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def rendering_json(response: aiohttp.web.StreamResponse) -> dict[str, Any]:
    import json

    assert isinstance(response, aiohttp.web.Response) and response.body is not None
    data = json.loads(bytes(response.body))  # type: ignore[arg-type]
    assert isinstance(data, dict)
    return data
