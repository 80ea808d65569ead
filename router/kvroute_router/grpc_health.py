"""``grpc.health.v1`` for the router's gRPC servers (ext_proc and kvroute.v1.Router)."""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def add_health(server: Any, services: list[str]) -> Any:
    """Register ``grpc.health.v1.Health`` on ``server``; :func:`set_serving` marks it up."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def set_serving(servicer: Any, services: list[str]) -> None:
    """Report SERVING for "" and ``services``."""
    for name in ["", *services]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
