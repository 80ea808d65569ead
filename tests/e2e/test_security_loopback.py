"""Issue 14 walk-arounds, tried as a hostile tenant would against a real router (proxy,
ext_proc and gRPC servers) over loopback fake engines: each must be closed (docs/security.md).
Not marked e2e: no vLLM needed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kvroute_router.app import Router, RouterSettings
from test_router_loopback import FakeEngine

TIMEOUT = aiohttp.ClientTimeout(total=60)


def pool(name: str, address: str, model: str = "fake-model", namespace: str = "default",
         **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"mode": "External", "model": {"name": model}, "resources": {"gpus": 0},
                     "endpoints": [{"name": f"{name}-0", "address": address}], **spec}}


def policy(name: str, pools: list[str], model: str = "chat", namespace: str = "default",
           **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"match": {"model": model}, "pools": [{"name": p} for p in pools], **spec}}


ONE_PER_MINUTE = [{"name": "tight", "requestsPerMinute": 1}]


@contextlib.asynccontextmanager
async def running_router(tmp_path: Path, docs: list[dict[str, Any]], **settings: Any
                         ) -> AsyncIterator[tuple[Router, str]]:
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump_all(docs))
    router = Router(RouterSettings(**{
        "config_paths": [config], "host": "127.0.0.1", "http_port": 0, "ext_proc_port": None,
        "grpc_port": None, "metrics_port": None, "scrape_interval_s": 0.05,
        "config_poll_interval_s": 0.05, "kv_events": False, "quality_embedding": "hashed",
        **settings}))
    await router.start()
    try:
        yield router, f"http://127.0.0.1:{router.ports['http']}"
    finally:
        await router.stop()


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    fake = FakeEngine()
    await fake.start()
    yield fake
    fake.release.set()
    await fake.stop()


async def post(s: aiohttp.ClientSession, url: str, model: str,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with s.post(f"{url}/v1/completions", headers=headers or {},
                      json={"model": model, "prompt": "hi", "max_tokens": 4}) as resp:
        return resp.status, await resp.json()


# ---- item 1: a pool a policy targets is reachable only through a policy -------------------------

async def test_the_served_name_of_a_policy_pool_does_not_skip_the_budget(
        tmp_path: Path, engine: FakeEngine) -> None:
    docs = [pool("fake", engine.address), policy("chat", ["fake"], budgets=ONE_PER_MINUTE)]
    async with running_router(tmp_path, docs) as (_, url), \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(f"{url}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["chat"]
        assert (await post(s, url, "chat"))[0] == 200
        assert (await post(s, url, "chat"))[0] == 429
        status, body = await post(s, url, "fake-model")  # the walk-around: the served name
        assert status == 404, body
        assert body["error"]["code"] == "model_not_found"
        assert "chat" in body["error"]["message"]
    assert engine.requests == 1


async def test_a_pool_that_opts_in_is_reachable_directly_through_a_default_policy(
        tmp_path: Path, engine: FakeEngine) -> None:
    docs = [pool("fake", engine.address, directAccess=True),
            policy("chat", ["fake"], budgets=ONE_PER_MINUTE)]
    async with running_router(tmp_path, docs) as (router, url), \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(f"{url}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["chat", "fake-model"]
        assert (await post(s, url, "fake-model"))[0] == 200
        assert (await post(s, url, "fake-model"))[0] == 200  # the default policy: no budgets
        requests = router.metrics.registry.get_sample_value(
            "kvroute_requests_total", {"policy": "implicit-fake", "pool": "fake",
                                       "endpoint": "fake-0", "status": "200"})
        assert requests == 2


# ---- item 6: resolution scoped to namespaces, conflicts refused --------------------------------

async def test_a_policy_in_another_namespace_cannot_capture_a_model(
        tmp_path: Path, engine: FakeEngine) -> None:
    """``aaa/grab`` claims ``chat`` next to ``team/chat``: never resolved by name order."""
    docs = [pool("fake", engine.address, namespace="team"),
            policy("chat", ["fake"], namespace="team", budgets=ONE_PER_MINUTE),
            pool("sink", engine.address, model="sink-model", namespace="aaa"),
            policy("grab", ["sink"], namespace="aaa")]
    async with running_router(tmp_path, docs, trusted_proxy_cidrs=["127.0.0.1/32"]) \
            as (_, url), aiohttp.ClientSession(timeout=TIMEOUT) as s:
        status, body = await post(s, url, "chat")
        assert status == 409, body
        assert body["error"]["code"] == "policy_conflict"
        assert body["error"]["param"] == "model"
        assert "aaa/grab" in body["error"]["message"]
        assert "team/chat" in body["error"]["message"]
        # The trusted hop scopes the request to its namespace: the team's policy and budget.
        scoped = {"x-kvroute-namespace": "team"}
        assert (await post(s, url, "chat", scoped))[0] == 200
        assert (await post(s, url, "chat", scoped))[0] == 429
    assert engine.models_seen == ["fake-model"]


async def test_a_scope_header_from_an_untrusted_client_is_ignored(
        tmp_path: Path, engine: FakeEngine) -> None:
    docs = [pool("fake", engine.address, namespace="team"),
            policy("chat", ["fake"], namespace="team"),
            pool("sink", engine.address, model="sink-model", namespace="aaa"),
            policy("grab", ["sink"], namespace="aaa")]
    async with running_router(tmp_path, docs) as (_, url), \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        status, body = await post(s, url, "chat", {"x-kvroute-namespace": "aaa"})
        assert status == 409, body
    assert engine.requests == 0


async def test_a_header_match_sent_by_the_client_does_not_select_a_policy(
        tmp_path: Path, engine: FakeEngine) -> None:
    """A policy matching ``content-type`` would beat the budgeted one; clients' match headers
    are not believed (gated), so the budgeted policy applies."""
    docs = [pool("fake", engine.address),
            policy("chat", ["fake"], budgets=ONE_PER_MINUTE),
            pool("free", engine.address, model="free-model"),
            {**policy("free", ["free"]), "spec": {
                "match": {"model": "chat", "headers": [{"name": "x-team", "value": "a"}]},
                "pools": [{"name": "free"}]}}]
    async with running_router(tmp_path, docs) as (_, url), \
            aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert (await post(s, url, "chat", {"x-team": "a"}))[0] == 200
        assert (await post(s, url, "chat", {"x-team": "a"}))[0] == 429
    assert engine.models_seen == ["fake-model"]
