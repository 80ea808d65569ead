"""A typed asyncio client of ``kvroute.v1.Router`` (sidecars, tests, the benchmark)."""

from __future__ import annotations

from typing import Any

import grpc

from kvroute_router.proto_gen import router_pb2 as pb


class RouterClient:
    """``Pick`` and ``Report`` over one ``grpc.aio`` channel."""

    def __init__(self, target: str) -> None:
        self.channel: Any = grpc.aio.insecure_channel(target)
        self._pick: Any = self.channel.unary_unary(
            "/kvroute.v1.Router/Pick", request_serializer=pb.PickRequest.SerializeToString,
            response_deserializer=pb.PickResponse.FromString)
        self._report: Any = self.channel.unary_unary(
            "/kvroute.v1.Router/Report", request_serializer=pb.ReportRequest.SerializeToString,
            response_deserializer=pb.ReportResponse.FromString)

    async def pick(self, request: pb.PickRequest, deadline_s: float = 10.0) -> pb.PickResponse:
        response: pb.PickResponse = await self._pick(request, timeout=deadline_s)
        return response

    async def report(self, request: pb.ReportRequest, deadline_s: float = 10.0
                     ) -> pb.ReportResponse:
        response: pb.ReportResponse = await self._report(request, timeout=deadline_s)
        return response

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
