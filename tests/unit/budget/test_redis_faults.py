"""The budget store failing, against a real redis-server: refused (nothing listening),
black-holed (a loopback socket that accepts and never answers), a release that fails and
recovers, and Redis Cluster (the multi-key script's keys share one hash slot). Each store call
is bounded by ``budgetStore.timeoutMs``; the policy's ``onError`` decides between admitting
unmetered and a 503 with an OpenAI error body — never a 500, never a hang."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from kvroute_api.inference_pool import InferencePool
from kvroute_api.route_policy import BudgetSpec, BudgetStoreSpec, RoutePolicy
from kvroute_cli.localredis import RedisStartError, start_redis
from kvroute_router.admission.hook import BudgetHook
from kvroute_router.budget.ledger import BudgetLedger, RequestEstimate
from kvroute_router.budget.meters import RedisMeterStore
from kvroute_router.budget.metrics import BudgetMetrics
from kvroute_router.budget.pricing import PoolEconomics
from kvroute_router.datastore.store import Datastore
from kvroute_router.director import Director
from kvroute_router.framework.registry import PluginRegistry
from kvroute_router.plugins import register_builtin_plugins
from kvroute_router.proxy.server import OpenAIProxy
from prometheus_client import CollectorRegistry

from tests.unit.conftest import ManualClock, _free_port

SMALL = RequestEstimate(prompt_tokens=10, max_output_tokens=10)
BUDGETS = [BudgetSpec(name="team", usd=100.0, window="1h", max_concurrency=1),
           BudgetSpec(name="tokens", tokens_per_minute=1_000_000)]
CLOSED = BudgetStoreSpec(on_error="FailClosed", timeout_ms=200)
OPEN = BudgetStoreSpec(on_error="FailOpen", timeout_ms=200)
HANG_BOUND_S = 3.0  # far above the 200 ms store timeout; the black hole would wait forever


class BlackHole:
    """A loopback TCP server that accepts connections and never answers."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> BlackHole:
        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while await reader.read(65536):
                    pass
            writer.close()

        self._server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


class FlakyProxy:
    """Forwards loopback TCP to redis-server; while ``dropping``, client bytes are discarded
    (the server never sees the command, the client never gets an answer)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.dropping = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> FlakyProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       droppable: bool) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if droppable and self.dropping:
                        continue
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


def _ledger(port: int, store: BudgetStoreSpec, clock: ManualClock | None = None,
            metrics: BudgetMetrics | None = None) -> tuple[BudgetLedger, Any]:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    # No retries inside the client: the outage below outlasts any client retry budget.
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=5,
                            retry=Retry(NoBackoff(), 0))
    ledger = (BudgetLedger(RedisMeterStore(client), metrics=metrics, clock=clock) if clock
              else BudgetLedger(RedisMeterStore(client), metrics=metrics))
    ledger.update_policy("chat", BUDGETS, request_timeout_s=60, store=store)
    return ledger, client


async def test_redis_refused_fails_closed_with_503_or_open_unmetered(
        strong_pool: PoolEconomics) -> None:
    port = _free_port()  # nothing listens there
    registry = CollectorRegistry()
    metrics = BudgetMetrics(registry)
    for spec, admitted in ((CLOSED, False), (OPEN, True)):
        ledger, client = _ledger(port, spec, metrics=metrics)
        try:
            decision = await asyncio.wait_for(
                ledger.reserve("chat", "a", [strong_pool], SMALL), HANG_BOUND_S)
        finally:
            await client.aclose()
        if admitted:
            assert decision.unmetered and decision.pool == "strong"
            assert decision.reservation is None and decision.error is None
        else:
            assert not decision.unmetered and decision.error is not None
            assert decision.error.status == 503
            assert decision.error.code == "budget_store_unavailable"
            assert "FailClosed" in decision.error.message
    for on_error in ("FailOpen", "FailClosed"):
        assert registry.get_sample_value("kvroute_budget_store_errors_total", {
            "policy_namespace": "default", "policy": "chat", "operation": "reserve",
            "on_error": on_error}) == 1


async def test_during_an_outage_only_one_request_per_probe_interval_waits_for_redis(
        strong_pool: PoolEconomics) -> None:
    # The others get onError at once instead of each waiting out timeoutMs.
    registry = CollectorRegistry()
    async with BlackHole() as hole:
        ledger, client = _ledger(hole.port, OPEN, metrics=BudgetMetrics(registry))
        ledger.store_probe_s = 600.0  # no second probe within the test, however slow the host
        try:
            decisions = [await asyncio.wait_for(ledger.reserve("chat", "a", [strong_pool],
                                                                SMALL), HANG_BOUND_S)
                         for _ in range(10)]
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), HANG_BOUND_S)
    assert all(d.unmetered for d in decisions)
    assert registry.get_sample_value("kvroute_budget_store_errors_total", {
        "policy_namespace": "default", "policy": "chat", "operation": "reserve",
        "on_error": "FailOpen"}) == 1
    assert registry.get_sample_value("kvroute_budget_requests_total", {
        "policy_namespace": "default", "policy": "chat", "budget": "team", "tenant": "a",
        "outcome": "unmetered"}) == 10


async def test_redis_black_holed_answers_within_the_store_timeout(
        strong_pool: PoolEconomics) -> None:
    async with BlackHole() as hole:
        for spec in (CLOSED, OPEN):
            ledger, client = _ledger(hole.port, spec)
            try:
                decision = await asyncio.wait_for(
                    ledger.reserve("chat", "a", [strong_pool], SMALL), HANG_BOUND_S)
                assert decision.unmetered == (spec.on_error == "FailOpen")
                # The gauge refresh is bounded too (it runs in the hook's refresh loop).
                await asyncio.wait_for(ledger.remaining_usd("chat", "a"), HANG_BOUND_S)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.aclose(), HANG_BOUND_S)


async def test_a_release_that_fails_is_retried_and_the_slot_is_not_leaked(
        redis_server: int, redis_client: Any, clock: ManualClock,
        strong_pool: PoolEconomics) -> None:
    async with FlakyProxy(redis_server) as proxy:
        ledger, client = _ledger(proxy.port, CLOSED, clock=clock)
        try:
            held = await ledger.reserve("chat", "a", [strong_pool], SMALL)
            assert held.reservation is not None
            proxy.dropping = True  # Redis stops answering while the request settles ...
            settling = asyncio.create_task(ledger.settle(held.reservation, strong_pool, 5, 5))
            await asyncio.sleep(1.5)
            proxy.dropping = False  # ... and comes back
            await asyncio.wait_for(settling, 20)
            # maxConcurrency 1: the slot was freed, so the next request fits.
            again = await ledger.reserve("chat", "a", [strong_pool], SMALL)
            assert again.reservation is not None, again.error
        finally:
            await client.aclose()


@pytest.fixture(scope="module")
def redis_cluster_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A one-node Redis Cluster owning every slot: it refuses a script whose keys hash to
    different slots (CROSSSLOT), as any cluster does."""
    workdir = tmp_path_factory.mktemp("redis-cluster")
    try:
        # The bus port defaults to port + 10000, past 65535 for a high ephemeral port.
        process, port = start_redis(workdir, [
            "--cluster-enabled", "yes", "--cluster-port", str(_free_port()),
            "--cluster-config-file", str(workdir / "nodes.conf")])
    except RedisStartError as exc:
        pytest.fail(str(exc))
    try:
        subprocess.run([shutil.which("redis-cli") or "redis-cli", "-p", str(port),
                        "cluster", "addslotsrange", "0", "16383"], check=True,
                       capture_output=True, timeout=10)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_the_reservation_script_runs_on_redis_cluster(
        redis_cluster_node: int, clock: ManualClock, strong_pool: PoolEconomics) -> None:
    ledger, client = _ledger(redis_cluster_node, CLOSED, clock=clock)
    try:
        for _ in range(50):  # the cluster reports ok once it has taken the slots
            info = await client.execute_command("CLUSTER INFO")  # parsed into a dict
            if str(info.get("cluster_state", b"")).find("ok") >= 0:
                break
            await asyncio.sleep(0.1)
        decision = await ledger.reserve("chat", "a", [strong_pool], SMALL)
        assert decision.reservation is not None, decision.error  # 4 meters, one slot
        refused = await ledger.reserve("chat", "a", [strong_pool], SMALL)
        assert refused.error is not None and refused.error.status == 429  # maxConcurrency 1
        await ledger.settle(decision.reservation, strong_pool, 5, 5)
        assert (await ledger.reserve("chat", "a", [strong_pool], SMALL)).admitted
    finally:
        await client.aclose()


def _router(policy_store: dict[str, Any], redis_port: int) -> tuple[Director, Datastore]:
    pool = InferencePool.model_validate({
        "apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "strong"},
        "spec": {"mode": "External", "model": {"name": "m"}, "resources": {"gpus": 0},
                 "engine": {"blockSize": 32},
                 "endpoints": [{"name": "strong-0", "address": f"127.0.0.1:{_free_port()}"}]},
    }, by_alias=True)
    policy = RoutePolicy.model_validate({
        "apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy", "metadata": {"name": "chat"},
        "spec": {"match": {"model": "chat"}, "pools": [{"name": "strong"}],
                 "budgets": [{"name": "team", "maxConcurrency": 5}],
                 "budgetStore": policy_store}}, by_alias=True)
    store = Datastore()
    store.replace([pool], [policy])
    return Director(store, register_builtin_plugins(PluginRegistry())), store


@pytest.fixture
async def refused_proxy_client() -> AsyncIterator[TestClient[Any, Any]]:
    import redis.asyncio as aioredis

    director, store = _router({"onError": "FailClosed", "timeoutMs": 200}, _free_port())
    client = aioredis.Redis(host="127.0.0.1", port=_free_port())
    director.add_admission_hook(BudgetHook(store, ledger=BudgetLedger(RedisMeterStore(client))))
    async with TestClient(TestServer(OpenAIProxy(director, store).app)) as http:
        yield http
    await client.aclose()


async def test_a_fail_closed_policy_answers_503_with_an_openai_error_body(
        refused_proxy_client: TestClient[Any, Any]) -> None:
    response = await refused_proxy_client.post(
        "/v1/chat/completions", json={"model": "chat", "max_tokens": 5,
                                      "messages": [{"role": "user", "content": "hi"}]},
        timeout=aiohttp.ClientTimeout(total=HANG_BOUND_S))
    assert response.status == 503
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["error"]["code"] == "budget_store_unavailable"
    assert "FailClosed" in body["error"]["message"]
    assert response.headers.get("retry-after") == "1"


async def test_a_fail_open_policy_routes_unmetered_and_finishes_cleanly() -> None:
    import redis.asyncio as aioredis
    from kvroute_router.director import Outcome

    director, store = _router({"onError": "FailOpen", "timeoutMs": 200}, _free_port())
    client = aioredis.Redis(host="127.0.0.1", port=_free_port())
    registry = CollectorRegistry()
    metrics = BudgetMetrics(registry)
    hook = BudgetHook(store, metrics=metrics, ledger=BudgetLedger(RedisMeterStore(client)))
    director.add_admission_hook(hook)
    try:
        from kvroute_router.framework.request import LLMRequest

        for _ in range(3):  # maxConcurrency 5 is not enforced, nothing is held either
            decision = await asyncio.wait_for(director.route(LLMRequest(
                model="chat", prompt_text="hi", max_tokens=5)), HANG_BOUND_S)
            endpoint = decision.endpoints[0]
            director.dispatch(decision, endpoint)
            director.end_attempt(decision, endpoint)
            director.finish(decision, endpoint, Outcome(status=200, prompt_tokens=1,
                                                        completion_tokens=1))
        assert not hook._tasks  # nothing to settle
        assert registry.get_sample_value("kvroute_budget_requests_total", {
            "policy_namespace": "default", "policy": "chat", "budget": "team",
            "tenant": "anonymous", "outcome": "unmetered"}) == 3
    finally:
        await client.aclose()
