"""A small asyncio Kubernetes API client for the operator's own calls: server-side apply of
children, reads of pods and referenced objects, status and scale writes, deletes.

kopf has its own connection for watching; this client loads the same credentials through the
official ``kubernetes`` package's configuration loaders (in-cluster service account, then
kubeconfig) and talks HTTP with aiohttp, so nothing blocks the event loop.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from kvroute_operator.builders import FIELD_MANAGER

APPLY_CONTENT_TYPE: Final = "application/apply-patch+yaml"
MERGE_CONTENT_TYPE: Final = "application/merge-patch+json"


@dataclass(frozen=True)
class ResourceType:
    """Where a kind lives in the API."""

    api_version: str
    plural: str

    def path(self, namespace: str | None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f"/api/{self.api_version}" if "/" not in self.api_version \
            else f"/apis/{self.api_version}"
        path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{self.plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path


RESOURCES: Final = {
    ("apps/v1", "Deployment"): ResourceType("apps/v1", "deployments"),
    ("v1", "Service"): ResourceType("v1", "services"),
    ("v1", "Pod"): ResourceType("v1", "pods"),
    ("policy/v1", "PodDisruptionBudget"): ResourceType("policy/v1", "poddisruptionbudgets"),
    ("kvroute.io/v1alpha1", "InferencePool"): ResourceType("kvroute.io/v1alpha1",
                                                           "inferencepools"),
    ("kvroute.io/v1alpha1", "RoutePolicy"): ResourceType("kvroute.io/v1alpha1",
                                                         "routepolicies"),
    ("kvroute.io/v1alpha1", "CacheTier"): ResourceType("kvroute.io/v1alpha1", "cachetiers"),
}


def resource_type(api_version: str, kind: str) -> ResourceType:
    try:
        return RESOURCES[(api_version, kind)]
    except KeyError:
        raise ValueError(f"the operator does not manage {kind} ({api_version})") from None


class KubeApiError(Exception):
    """A non-2xx answer of the API server."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class KubeConnection:
    """Where and how to reach the API server."""

    server: str
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify_ssl: bool = True

    @classmethod
    def from_environment(cls) -> KubeConnection:
        """In-cluster service account first, then the current kubeconfig context."""
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            load_incluster: Any = config.load_incluster_config
            load_incluster(client_configuration=configuration)
        except config.ConfigException:
            load_kubeconfig: Any = config.load_kube_config
            load_kubeconfig(client_configuration=configuration)
        token = configuration.get_api_key_with_prefix("authorization")
        if token and token.lower().startswith("bearer "):
            token = token[7:]
        return cls(server=configuration.host, token=token or None,
                   ca_file=configuration.ssl_ca_cert, cert_file=configuration.cert_file,
                   key_file=configuration.key_file, verify_ssl=configuration.verify_ssl)


class KubeClient:
    """Async calls the operator makes; one aiohttp session shared by all handlers."""

    def __init__(self, connection: KubeConnection) -> None:
        ssl_context: ssl.SSLContext | bool = False
        if connection.server.startswith("https"):
            if connection.verify_ssl:
                ssl_context = ssl.create_default_context(cafile=connection.ca_file)
            else:
                ssl_context = ssl.create_default_context()
                ssl_context.check_hostname = False
                ssl_context.verify_mode = ssl.CERT_NONE
            if connection.cert_file and isinstance(ssl_context, ssl.SSLContext):
                ssl_context.load_cert_chain(connection.cert_file, connection.key_file)
        headers = {"Accept": "application/json"}
        if connection.token:
            headers["Authorization"] = f"Bearer {connection.token}"
        self._session = aiohttp.ClientSession(
            base_url=connection.server.rstrip("/") + "/", headers=headers,
            connector=aiohttp.TCPConnector(ssl=ssl_context),
            timeout=aiohttp.ClientTimeout(total=30))

    async def close(self) -> None:
        await self._session.close()

    async def _request(self, method: str, path: str, *, body: Any = None,
                       params: dict[str, str] | None = None,
                       content_type: str | None = None) -> dict[str, Any]:
        headers = {"Content-Type": content_type} if content_type else None
        async with self._session.request(method, path.lstrip("/"), json=body, params=params,
                                         headers=headers) as response:
            try:
                data = await response.json(content_type=None)
            except ValueError:
                data = {"message": await response.text()}
            if response.status >= 400:
                data = data if isinstance(data, dict) else {}
                raise KubeApiError(response.status, str(data.get("reason", response.reason)),
                                   str(data.get("message", "")))
            return data if isinstance(data, dict) else {}

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply with the operator's field manager (forcing ownership of the fields
        it sets: a hand edit of those fields is drift and is put back)."""
        meta = manifest["metadata"]
        rtype = resource_type(manifest["apiVersion"], manifest["kind"])
        return await self._request(
            "PATCH", rtype.path(meta.get("namespace"), meta["name"]), body=manifest,
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type=APPLY_CONTENT_TYPE)

    async def get(self, api_version: str, kind: str, namespace: str | None,
                  name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self._request(
                "GET", resource_type(api_version, kind).path(namespace, name))
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, api_version: str, kind: str, namespace: str | None,
                   label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        data = await self._request("GET", resource_type(api_version, kind).path(namespace),
                                   params=params)
        items = data.get("items") or []
        return [item for item in items if isinstance(item, dict)]

    async def delete(self, api_version: str, kind: str, namespace: str | None,
                     name: str) -> bool:
        """Delete (background propagation); False when it was already gone."""
        try:
            await self._request("DELETE", resource_type(api_version, kind).path(namespace, name),
                                body={"propagationPolicy": "Background"})
        except KubeApiError as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    async def patch_status(self, api_version: str, kind: str, namespace: str | None, name: str,
                           status: dict[str, Any]) -> None:
        """Replace the status fields given (JSON merge patch on the status subresource)."""
        await self._request("PATCH", resource_type(api_version, kind).path(namespace, name,
                                                                          "status"),
                            body={"status": status}, content_type=MERGE_CONTENT_TYPE)

    async def scale(self, api_version: str, kind: str, namespace: str | None, name: str,
                    replicas: int) -> None:
        """Set spec.replicas through the scale subresource (what kubectl scale does)."""
        await self._request("PATCH", resource_type(api_version, kind).path(namespace, name,
                                                                          "scale"),
                            body={"spec": {"replicas": replicas}},
                            content_type=MERGE_CONTENT_TYPE)
