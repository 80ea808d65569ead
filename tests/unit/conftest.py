"""Fixtures of the budget tests: a controllable clock, pools, and a client of the real
redis-server (``redis_server``, in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kvroute_cli.localredis import free_port
from kvroute_router.budget.pricing import PoolEconomics

ROUTELLM_CSV = (Path(__file__).resolve().parents[2].parent
                / "shared/data/routellm/correctness.csv.gz")


class ManualClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def weak_pool() -> PoolEconomics:
    # 1 USD per million tokens in and out: 1000 tokens cost 0.001 USD.
    return PoolEconomics(name="weak", usd_per_input_token=1e-6, usd_per_output_token=1e-6,
                         tier="weak")


@pytest.fixture
def strong_pool() -> PoolEconomics:
    return PoolEconomics(name="strong", usd_per_input_token=10e-6, usd_per_output_token=10e-6,
                         tier="strong")


def _free_port() -> int:
    return free_port()


@pytest.fixture
async def redis_client(redis_server: int) -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis(host="127.0.0.1", port=redis_server, decode_responses=True)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()
