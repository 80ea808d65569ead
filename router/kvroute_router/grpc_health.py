"""``grpc.health.v1`` for the router's gRPC servers (Envoy ext_proc on 9002, ``kvroute.v1.Router``
on 9003): each registers the standard health service and reports SERVING for the empty service
name and its own, once it is ready to answer, and NOT_SERVING from the start of shutdown (before
the server stops accepting), so a health-checking client stops sending first."""

from __future__ import annotations

import weakref
from typing import Any

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

_SERVICERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
"""Each server's health servicer (``enter_shutdown`` finds it by server)."""


class _HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpcio's servicer, except that a ``Watch`` stream ends (OK) once it has sent NOT_SERVING
    at shutdown: grpcio's never ends, so one watcher held the server's graceful stop, and the
    router's exit, for the whole grace."""

    async def Watch(self, request: Any, context: Any) -> None:  # noqa: N802 (gRPC's name)
        condition = self._server_watchers[request.service]
        self._watcher_count_by_service[request.service] += 1
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(
                        request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    if self._gracefully_shutting_down:
                        return
                    await condition.wait()
        finally:
            self._watcher_count_by_service[request.service] -= 1
            if self._watcher_count_by_service[request.service] == 0:
                del self._server_watchers[request.service]
                del self._watcher_count_by_service[request.service]


def add_health(server: Any, services: list[str]) -> Any:
    """Register ``grpc.health.v1.Health`` reporting SERVING for "" and ``services``."""
    servicer = _HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    _SERVICERS[server] = servicer
    return servicer


async def set_serving(servicer: Any, services: list[str]) -> None:
    for name in ["", *services]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def enter_shutdown(server: Any) -> None:
    """Report NOT_SERVING for every service of ``server`` (a grpc.aio server, or a wrapper
    holding one as ``.server``) from now on; its RPCs still run, and ``Watch`` streams end."""
    servicer = _SERVICERS.get(getattr(server, "server", server))  # a wrapper's grpc server
    if servicer is not None:
        await servicer.enter_graceful_shutdown()
