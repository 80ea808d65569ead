"""CacheTier ``redis.urlSecretRef`` in Kubernetes mode: the router reads the Redis URL from the
Secret the tier names (by name, in the tier's namespace) and the response cache uses it, against
a real redis-server. Without the Secret read, the tier would have no store."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
import redis
from kvroute_router.datastore.kube_source import KubernetesSource
from kvroute_router.datastore.store import Datastore
from kvroute_router.framework.request import LLMRequest
from kvroute_router.openai.requests import parse_request
from kvroute_router.responsecache.metrics import ResponseCacheMetrics
from kvroute_router.responsecache.service import REDIS_URL_ENV, ResponseCache
from prometheus_client import CollectorRegistry

from tests.unit.router.test_kube_source import FakeCore

NS = "inference"


def _objects(secret: str) -> tuple[dict[str, Any], dict[str, Any]]:
    policy = {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
              "metadata": {"name": "chat", "namespace": NS},
              "spec": {"match": {"model": "chat"}, "pools": [{"name": "llama"}],
                       "responseCache": {"cacheTierRef": {"name": "answers"}}}}
    tier = {"apiVersion": "kvroute.io/v1alpha1", "kind": "CacheTier",
            "metadata": {"name": "answers", "namespace": NS},
            "spec": {"response": {"backend": "redis", "similarityThreshold": 1.0,
                                  "redis": {"urlSecretRef": {"name": secret, "key": "url"},
                                            "keyPrefix": "sec:"}}}}
    return policy, tier


def _request() -> LLMRequest:
    body = {"model": "chat", "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    return LLMRequest.from_openai(parse_request(body, "chat"), {})


ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "chat",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}


async def test_the_redis_url_comes_from_the_secret_the_cache_tier_names(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    store = Datastore()
    source = KubernetesSource(store, namespace=NS)
    source._loop = asyncio.get_running_loop()
    reader = FakeCore({"redis-url": {
        "metadata": {"name": "redis-url", "namespace": NS},
        "data": {"url": base64.b64encode(redis_url.encode()).decode()}}})
    source._core = reader
    policy, tier = _objects("redis-url")
    source._relist("routepolicies", [policy])
    source._relist("cachetiers", [tier])
    for _ in range(500):  # the read runs in a thread: bounded wait
        if store.secret_value(f"{NS}/redis-url", "url") is not None:
            break
        await asyncio.sleep(0.01)
    assert reader.reads == [(NS, "redis-url")]
    cache = ResponseCache(store, ResponseCacheMetrics(CollectorRegistry()))
    try:
        miss = await cache.lookup(_request())
        assert miss.match == "miss" and miss._cache is not None  # the tier has a store
        recorder = miss.recorder()
        assert recorder is not None
        recorder.feed(json.dumps(ANSWER).encode())
        miss.finish(recorder, 200)
        await cache.drain()
        # The answer went to the Redis server of the Secret's URL.
        client = redis.Redis.from_url(redis_url)
        try:
            assert client.keys(f"sec:rc:{NS}/answers:e:*")
        finally:
            client.close()
        hit = await cache.lookup(_request())
        assert hit.match == "exact"
        assert hit.answer is not None
        assert hit.answer["choices"][0]["message"]["content"] == "Paris."
    finally:
        await cache.stop()
