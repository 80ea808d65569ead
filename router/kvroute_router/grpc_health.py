"""``grpc.health.v1`` for the router's gRPC servers (Envoy ext_proc on 9002, ``kvroute.v1.Router``
on 9003): each registers the standard health service and reports SERVING for the empty service
name and its own, once it is ready to answer."""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def add_health(server: Any, services: list[str]) -> Any:
    """Register ``grpc.health.v1.Health`` reporting SERVING for "" and ``services``."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def set_serving(servicer: Any, services: list[str]) -> None:
    for name in ["", *services]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
