"""Fixtures of the budget tests: a controllable clock, pools, and a real redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: scripts/system-deps.sh installs it")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail("redis-server did not start listening")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
async def redis_client(redis_server: int) -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis(host="127.0.0.1", port=redis_server, decode_responses=True)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()
