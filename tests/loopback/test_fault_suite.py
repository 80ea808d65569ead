"""The fault suite (issue 16 item 2): a real ``Router`` in front of an emulated fleet
(``kvroute_emulator``: two vLLM-compatible engines with KV events on real ZMQ sockets, the test
model's tokenizer), faults injected through the fleet's admin endpoint (kill, stall, restart
with a new KV-event sequence, dropped and garbled event batches) and by restarting the router.
Each test asserts what the client sees and what is billed (the budget's token counters against
the ``usage`` the client received), and that no slot or reservation stays in flight.

``FAULTS`` counts the faults injected and the requests sent and lost, for docs/reliability.md
(printed at the end with ``-s``). Bounds are hang detectors, not performance thresholds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import msgspec
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvroute_emulator.fleet import EmulatedFleet, FleetConfig
from kvroute_emulator.model.profile import cpu_test_engine
from kvroute_router.app import Router, RouterSettings

from tests.emulated import MODEL, emulated_fleet, fleet_pool
from tests.routers import running

pytestmark = pytest.mark.loopback

FAULTS: Counter[str] = Counter()
"""Across the suite: faults injected, requests sent, requests lost (not answered 200)."""


@pytest.fixture(scope="module", autouse=True)
def report_figures() -> Iterator[None]:
    yield
    print(f"\nfault suite: {dict(FAULTS)}")


def _config(tmp_path: Path, fleet: EmulatedFleet, per_try_ms: int) -> Path:
    docs = [
        fleet_pool(fleet),
        {"apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy", "metadata": {"name": "chat"},
         "spec": {"match": {"model": "chat"}, "pools": [{"name": "emu"}],
                  "retries": {"perTryTimeoutMs": per_try_ms},
                  "scoring": {"scorers": [{"type": "prefix-precise", "weight": 1},
                                          {"type": "running-requests"}]},
                  "budgets": [{"name": "each", "tenant": "*", "tokensPerMinute": 10**9,
                               "maxConcurrency": 1000}]}},
    ]
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump_all(docs))
    return config


@contextlib.asynccontextmanager
async def running_router(config: Path, model_dir: Path) -> AsyncIterator[tuple[Router, str]]:
    async with running(RouterSettings(config_paths=[config], host="127.0.0.1", http_port=0,
                                      ext_proc_port=None, grpc_port=None, metrics_port=None,
                                      scrape_interval_s=0.05, config_poll_interval_s=0.05,
                                      tokenizer_dirs={MODEL: model_dir})) as started:
        yield started


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 20.0,
                     diagnose: Callable[[], object] = lambda: "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{what} within {timeout_s} s {diagnose()}")
        await asyncio.sleep(0.02)


async def admin(fleet: EmulatedFleet, index: int, action: str, **body: object) -> None:
    FAULTS["faults injected"] += action not in ("resume", "events") or any(body.values())
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{fleet.admin_port}/engines/{index}/{action}", json=body) as resp:
        assert resp.status == 200, await resp.text()


def prompt(i: int) -> str:
    return f"request {i}: " + " ".join(f"word{i}x{j}" for j in range(40))


async def ask(session: aiohttp.ClientSession, url: str, i: int, stream: bool = True
              ) -> tuple[str, dict[str, int]]:
    """One completion; the served endpoint and the usage the client received. A request that
    is not answered 200 with a complete body counts as lost and fails the test."""
    FAULTS["requests sent"] += 1
    body = {"model": "chat", "prompt": prompt(i), "max_tokens": 4, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    async with asyncio.timeout(60), session.post(f"{url}/v1/completions", json=body) as resp:
        data = await resp.read()
        if resp.status != 200:
            FAULTS["requests lost"] += 1
            pytest.fail(f"request {i}: {resp.status} {data[:300]!r}")
        served = resp.headers["x-kvroute-endpoint"]
    if not stream:
        return served, json.loads(data)["usage"]
    events = [line.removeprefix(b"data: ") for line in data.split(b"\n\n") if line]
    if events[-1] != b"[DONE]":
        FAULTS["requests lost"] += 1
        pytest.fail(f"request {i}: the stream did not end with [DONE]: {data[-300:]!r}")
    usage = json.loads(events[-2])["usage"]
    return served, usage


def billed(router: Router) -> dict[str, float]:
    """Tokens charged to the policy's budgets, by kind."""
    out: dict[str, float] = {"prompt": 0.0, "output": 0.0}
    for metric in router.metrics.registry.collect():
        if metric.name == "kvroute_budget_tokens":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["kind"]] += sample.value
    return out


def in_flight(router: Router) -> tuple[int, float]:
    slots = sum(e.in_flight for e in router.datastore.endpoints())
    reserved = sum(s.value for metric in router.metrics.registry.collect()
                   if metric.name == "kvroute_budget_in_flight" for s in metric.samples)
    return slots, reserved


def retries(router: Router) -> float:
    return sum(s.value for metric in router.metrics.registry.collect()
               if metric.name == "kvroute_retries" for s in metric.samples
               if s.name.endswith("_total"))


async def served_all(router: Router, url: str, ids: range, stream: bool = True
                     ) -> list[str]:
    """Send the requests one by one; check each one's billing against its usage."""
    served = []
    async with aiohttp.ClientSession() as s:
        for i in ids:
            before = billed(router)
            endpoint, usage = await ask(s, url, i, stream)
            served.append(endpoint)
            await eventually(lambda: in_flight(router) == (0, 0.0), "slots released")
            after = billed(router)
            assert after["prompt"] - before["prompt"] == usage["prompt_tokens"]
            assert after["output"] - before["output"] == usage["completion_tokens"]
    return served


def addresses(fleet: EmulatedFleet) -> list[str]:
    return [e["url"].removeprefix("http://") for e in fleet.endpoints()]


async def test_an_engine_killed_is_retried_elsewhere_and_the_client_sees_success(
        tmp_path: Path, fleet: EmulatedFleet, model_dir: Path) -> None:
    async with running_router(_config(tmp_path, fleet, 5000), model_dir) as (router, url):
        await served_all(router, url, range(2))
        await admin(fleet, 0, "kill")
        # Until the router learns, picks may still land on the dead engine: refused before
        # the first byte, retried on the other; the client sees success, billed once.
        served = await served_all(router, url, range(2, 10))
        served += await served_all(router, url, range(10, 12), stream=False)
        assert set(served) == {addresses(fleet)[1]}
        await admin(fleet, 0, "restart")
        await served_all(router, url, range(12, 14))


async def test_a_stalled_engine_times_out_per_try_and_is_retried(
        tmp_path: Path, fleet: EmulatedFleet, model_dir: Path) -> None:
    async with running_router(_config(tmp_path, fleet, 300), model_dir) as (router, url):
        await admin(fleet, 0, "stall")  # as SIGSTOP: the port accepts, nothing answers
        served = await served_all(router, url, range(100, 112))
        assert set(served) == {addresses(fleet)[1]}
        # Distinct prompts, ties broken at random: some first tries went to the stalled
        # engine and were abandoned after the per-try timeout.
        assert retries(router) >= 1
        await admin(fleet, 0, "resume")
        await served_all(router, url, range(112, 114))


async def test_metrics_timing_out_everywhere_does_not_refuse_traffic(
        tmp_path: Path, fleet: EmulatedFleet, model_dir: Path) -> None:
    """Every engine's ``/metrics`` too slow to answer (API servers busy, a starved node) while
    the engines serve: the router keeps routing (the healthy filter's panic rule) instead of
    answering 503 to everything — what the soak benchmark hit. An engine that refuses
    connections is still kept out."""
    async with running_router(_config(tmp_path, fleet, 5000), model_dir) as (router, url):
        await served_all(router, url, range(300, 302))
        for index in (0, 1):
            await admin(fleet, index, "metrics", delay_s=2.0)  # the scrape timeout is 0.5 s
        await eventually(lambda: all(ep.scrape_failures >= 3
                                     for ep in router.datastore.endpoints()),
                         "every endpoint's scrapes failing")
        await served_all(router, url, range(302, 308))
        await admin(fleet, 0, "kill")  # refused: retried on the other, then kept out
        served = await served_all(router, url, range(308, 314))
        assert set(served) == {addresses(fleet)[1]}
        await admin(fleet, 1, "metrics", delay_s=0.0)
        await admin(fleet, 0, "restart")
        await eventually(lambda: all(ep.scrape_failures == 0
                                     for ep in router.datastore.endpoints()),
                         "scrapes succeeding again")
        await served_all(router, url, range(314, 316))


def index_entries(router: Router) -> int:
    feeds = router.kv_event_feeds
    assert feeds is not None
    return sum(pool.index.entries() for pool in feeds._pools.values())


def engine_blocks(fleet: EmulatedFleet) -> int:
    return sum(len(slot.engine.sim.refcount) for slot in fleet.slots)


def kv_counter(router: Router, name: str) -> float:
    feeds = router.kv_event_feeds
    assert feeds is not None
    return sum(s.value for registry in feeds.metric_registries()
               for metric in registry.collect() for s in metric.samples
               if s.name == name)


def endpoint_blocks(router: Router, fleet: EmulatedFleet, index: int) -> tuple[int, int]:
    """(blocks the router's index gives engine ``index``, blocks the engine holds)."""
    feeds = router.kv_event_feeds
    assert feeds is not None
    name = fleet.endpoints()[index]["name"]
    indexed = sum(pool.index.block_count(name) for pool in feeds._pools.values())
    return indexed, len(fleet.slots[index].engine.sim.refcount)


def statuses(router: Router) -> dict[str, list[dict[str, Any]]]:
    return router.kv_event_feeds.statuses() if router.kv_event_feeds else {}


def index_diff(router: Router, fleet: EmulatedFleet) -> dict[str, Any]:
    """Per engine: blocks the index has that the engine does not, and the reverse (which
    sequence numbers they came in, from the engine's replay buffer); then the statuses."""
    feeds = router.kv_event_feeds
    assert feeds is not None
    diff: dict[str, Any] = {}
    for index, endpoint in enumerate(fleet.endpoints()):
        indexed = {h for pool in feeds._pools.values()
                   for h in pool.index._blocks.get(endpoint["name"], {})}
        engine = fleet.slots[index].engine
        held = set(engine.sim.refcount)
        publisher = engine.publisher
        seqs = {seq: payload for seq, payload in publisher.buffer} if publisher else {}

        def where(hashes: set[int], seqs: dict[int, bytes] = seqs) -> list[str]:
            found = []
            for seq, payload in sorted(seqs.items()):
                with contextlib.suppress(msgspec.DecodeError):
                    for event in msgspec.msgpack.decode(payload)[1]:
                        if hashes & set(event.get("block_hashes", ())):
                            found.append(f"{seq}:{event['type']}")
            return found

        extra, missing = indexed - held, held - indexed
        diff[endpoint["name"]] = {"indexed": len(indexed), "held": len(held),
                                  "extra": len(extra), "extra_in_seqs": where(extra),
                                  "missing": len(missing), "missing_in_seqs": where(missing),
                                  "published": publisher.seq if publisher else None,
                                  "dropped": publisher.dropped if publisher else None}
    diff["statuses"] = statuses(router)
    return diff


async def test_kv_event_gaps_garbage_and_publisher_restart(
        tmp_path: Path, fleet: EmulatedFleet, model_dir: Path) -> None:
    async with running_router(_config(tmp_path, fleet, 5000), model_dir) as (router, url):
        await served_all(router, url, range(200, 204))
        await eventually(lambda: index_entries(router) == engine_blocks(fleet) > 0,
                         "the index matches the engines' caches", diagnose=lambda: statuses(router))
        # Sequence gaps: half the batches lost on the PUB socket (replay still has them).
        for index in (0, 1):
            await admin(fleet, index, "events", drop=0.5)
        await served_all(router, url, range(204, 214))
        for index in (0, 1):
            await admin(fleet, index, "events", drop=0.0)
        # A gap shows when the engine's next batch arrives: one clean batch from each engine
        # (sent to it directly, so that each gets one).
        async with aiohttp.ClientSession() as s:
            for i, engine in enumerate(fleet.endpoints()):
                async with s.post(f"{engine['url']}/v1/completions", json={
                        "model": MODEL, "prompt": prompt(214 + i), "max_tokens": 1}) as resp:
                    assert resp.status == 200
        await eventually(lambda: kv_counter(router, "kvroute_kv_events_gaps_total") > 0
                         and all(s["synced"] for pool in statuses(router).values()
                                 for s in pool), "gaps detected and resynced by replay",
                         diagnose=lambda: statuses(router))
        # Exactly the engines' caches again: no batch stepped over (a replay that failed or
        # came back with a hole once left one engine a batch short; docs/reliability.md).
        await eventually(lambda: index_entries(router) == engine_blocks(fleet),
                         "the index matches the engines' caches after the resync",
                         diagnose=lambda: index_diff(router, fleet))
        # Garbage: batches published as invalid msgpack (the engine's replay buffer holds the
        # garbage too, so those blocks are lost at the source): counted, dropped, never applied;
        # the index under-reports that engine (a missed hit, never a wrong one) and the batches
        # after it are applied again.
        await admin(fleet, 1, "events", garble=0.5)
        await served_all(router, url, range(216, 226))
        await admin(fleet, 1, "events", garble=0.0)
        await eventually(lambda: kv_counter(router, "kvroute_kv_events_dropped_total") > 0,
                         "garbled batches counted")
        indexed_before = endpoint_blocks(router, fleet, 1)[0]
        served = await served_all(router, url, range(226, 240))
        assert addresses(fleet)[1] in served
        await eventually(lambda: endpoint_blocks(router, fleet, 1)[0] > indexed_before,
                         "batches after the garbage applied", diagnose=lambda: statuses(router))
        indexed, held = endpoint_blocks(router, fleet, 1)
        assert indexed <= held
        # Publisher restart: the engine's cache is empty and its sequence starts from 0.
        await admin(fleet, 0, "restart")
        await eventually(lambda: endpoint_blocks(router, fleet, 0)[0] == 0,
                         "the restarted engine's blocks dropped from the index",
                         diagnose=lambda: (endpoint_blocks(router, fleet, 0), statuses(router)))
        await served_all(router, url, range(240, 246))
        # The router may send all six to the other engine (ties, or the restarted one still
        # out of the healthy set): two more straight to the restarted engine, so that it holds
        # blocks whatever the routing did.
        async with aiohttp.ClientSession() as s:
            for i in (246, 247):
                async with s.post(f"{fleet.endpoints()[0]['url']}/v1/completions", json={
                        "model": MODEL, "prompt": prompt(i), "max_tokens": 1}) as resp:
                    assert resp.status == 200
        await eventually(lambda: endpoint_blocks(router, fleet, 0)[0]
                         == endpoint_blocks(router, fleet, 0)[1] > 0,
                         "the index follows the restarted engine",
                         diagnose=lambda: (endpoint_blocks(router, fleet, 0), statuses(router)))
        # Memory bounded: the index holds no more than the engines hold.
        assert index_entries(router) <= engine_blocks(fleet)


async def test_a_restarted_router_rebuilds_its_index_by_replay(
        tmp_path: Path, fleet: EmulatedFleet, model_dir: Path) -> None:
    config = _config(tmp_path, fleet, 5000)
    async with running_router(config, model_dir) as (router, url):
        await served_all(router, url, range(300, 306))
        await eventually(lambda: index_entries(router) == engine_blocks(fleet) > 0,
                         "the index matches the engines' caches")
        before = index_entries(router)
    FAULTS["faults injected"] += 1  # the router restart
    async with running_router(config, model_dir) as (router, url):
        # No new request: the index comes back from the engines' replay alone.
        await eventually(lambda: index_entries(router) == before,
                         "the restarted router's index rebuilt by replay")
        await served_all(router, url, range(300, 302))  # repeated prompts: served, billed


# -- router SIGTERM under load (a real router process) -------------------------------------

DRAIN_DELAY_S = 2.0
"""``--shutdown-delay-seconds``: readiness false and gRPC health NOT_SERVING while the
listeners still accept (the time a load balancer needs to stop sending)."""
GRACE_S = 60.0
STREAMS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _health_watch(address: str, seen: list[str], first: asyncio.Event) -> None:
    """Follow ``grpc.health.v1.Health/Watch`` for the empty service name until the server goes
    away; record every status (and how the watch ended)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=GRACE_S + 30)
        try:
            async for answer in call:
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
                first.set()
        except grpc.aio.AioRpcError as exc:
            seen.append(exc.code().name)
        first.set()


async def _stream(session: aiohttp.ClientSession, url: str, i: int,
                  started: asyncio.Event) -> tuple[bytes, float]:
    """A long chat stream; signals once its first chunk arrived; returns the whole body and
    when it ended."""
    body = {"model": "chat", "messages": [{"role": "user", "content": prompt(i)}],
            "max_tokens": 400, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.content.readany()
        started.set()
        data += await resp.read()
    return data, asyncio.get_running_loop().time()


@pytest.mark.asyncio(loop_factories=["uvloop"])  # the client's loop; the router's is the param
@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_router_sigterm_under_load_drains_streams_and_refuses_new_work(
        tmp_path: Path, model_dir: Path, event_loop: str) -> None:
    """SIGTERM to a real ``kvroute router`` process with streams in flight: ``/ready`` (the
    chart's readinessProbe) and the gRPC health of ext_proc and Pick turn NOT_SERVING first,
    while the listeners still accept; then new connections are refused; every in-flight stream
    ends complete (``[DONE]`` and usage); the process exits 0 within the grace. On each event
    loop ``--event-loop`` offers (uvloop is the default): the servers, signals and drain are
    the loop's."""
    # Real-time engines: a 400-token stream lasts longer than the drain delay.
    fleet = EmulatedFleet(FleetConfig(count=2, profile=cpu_test_engine(), model_dir=model_dir,
                                      served_model_name=MODEL, time_scale=1.0))
    await fleet.start()
    http, ext_proc, grpc_port = _free_port(), _free_port(), _free_port()
    url = f"http://127.0.0.1:{http}"
    log_path = tmp_path / "router.log"
    with log_path.open("wb") as log:
        router = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvroute_cli.main", "router", "--config",
            str(_config(tmp_path, fleet, 5000)), "--host", "127.0.0.1", "--port", str(http),
            "--ext-proc-port", str(ext_proc), "--grpc-port", str(grpc_port),
            "--metrics-port", "-1", "--tokenizer-dir", f"{MODEL}={model_dir}",
            "--shutdown-grace-seconds", str(GRACE_S),
            "--shutdown-delay-seconds", str(DRAIN_DELAY_S), "--event-loop", event_loop,
            stdout=log, stderr=asyncio.subprocess.STDOUT)
    loop = asyncio.get_running_loop()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            async def ready() -> bool:
                try:
                    async with s.get(f"{url}/ready") as resp:
                        return resp.status == 200
                except aiohttp.ClientConnectorError:
                    return False
            deadline = loop.time() + 60
            while not await ready():
                assert router.returncode is None, log_path.read_text()
                assert loop.time() < deadline, "the router did not become ready"
                await asyncio.sleep(0.1)
            watches: list[list[str]] = [[], []]
            watched = [asyncio.Event(), asyncio.Event()]
            watchers = [asyncio.create_task(_health_watch(f"127.0.0.1:{port}", seen, first))
                        for port, seen, first in zip((ext_proc, grpc_port), watches, watched,
                                                     strict=True)]
            for first in watched:
                await asyncio.wait_for(first.wait(), 30)
            starts = [asyncio.Event() for _ in range(STREAMS)]
            streams = [asyncio.create_task(_stream(s, url, 500 + i, started))
                       for i, started in enumerate(starts)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in starts)), 30)

            sigterm = loop.time()
            router.send_signal(signal.SIGTERM)
            # Readiness: 503 (with draining) before the port refuses; the probe's answers, in
            # order, are 200* 503+ refused.
            probes: list[str] = []
            while not probes or probes[-1] != "refused":
                try:
                    async with aiohttp.ClientSession() as fresh, fresh.get(f"{url}/ready") as r:
                        probes.append(str(r.status))
                        if r.status == 503:
                            assert (await r.json())["draining"] is True
                except (aiohttp.ClientConnectorError, aiohttp.ClientConnectionResetError,
                        aiohttp.ServerDisconnectedError):
                    # Refused — or, when the probe connects in the instant the listener closes,
                    # reset: the kernel had queued the connection, and closing the listening
                    # socket resets what was never accepted (a kubelet's probe fails the same
                    # way). A reset while the listener is still open would be a bug: the fresh
                    # connection below must then be refused, or the test fails there.
                    probes.append("refused")
                    refused_at = loop.time()
                assert loop.time() - sigterm < GRACE_S, probes[-5:]
                await asyncio.sleep(0.05)
            first_503 = probes.index("503")  # raises if readiness never answered 503
            assert set(probes[:first_503]) <= {"200"} and set(probes[first_503:-1]) == {"503"}
            # Nothing new is accepted: a fresh connection is refused; a request on a kept-alive
            # connection gets 503 with an OpenAI error body, or its connection is closed.
            with pytest.raises(aiohttp.ClientConnectorError):
                async with aiohttp.ClientSession() as fresh:
                    await fresh.post(f"{url}/v1/completions", json={"model": "chat",
                                                                    "prompt": "x"})
            try:
                async with s.post(f"{url}/v1/completions",
                                  json={"model": "chat", "prompt": "late"}) as late:
                    assert late.status == 503, await late.text()
                    assert (await late.json())["error"]["code"] == "shutting_down"
                    late_outcome = "503 shutting_down"
            except aiohttp.ClientConnectionError as exc:  # incl. refused, server disconnected
                late_outcome = type(exc).__name__
            # Every in-flight stream ends complete.
            ended = []
            for task in streams:
                data, at = await asyncio.wait_for(task, GRACE_S)
                events = [line.removeprefix(b"data: ") for line in data.split(b"\n\n") if line]
                assert events[-1] == b"[DONE]", data[-300:]
                assert json.loads(events[-2])["usage"]["completion_tokens"] == 400
                ended.append(at)
            FAULTS["requests sent"] += STREAMS
            # The process exits 0 once its work is done, not when the grace runs out.
            code = await asyncio.wait_for(router.wait(), GRACE_S / 2)
            exited = loop.time()
            assert code == 0, log_path.read_text()[-2000:]
            assert f"router listening ({event_loop} event loop)" in log_path.read_text()
            await asyncio.wait_for(asyncio.gather(*watchers), 30)
            # gRPC health: SERVING, then NOT_SERVING before the server went away.
            for seen in watches:
                assert seen[0] == "SERVING" and "NOT_SERVING" in seen, seen
                assert seen.index("NOT_SERVING") < len(seen) - 1 or seen[-1] == "NOT_SERVING"
            FAULTS["faults injected"] += 1
            print(f"\nSIGTERM with {STREAMS} streams in flight: /ready 503 from the first probe "
                  f"{probes.index('503') == 0}, port refused at {refused_at - sigterm:.2f} s "
                  f"(delay {DRAIN_DELAY_S} s), streams ended at {min(ended) - sigterm:.2f}-"
                  f"{max(ended) - sigterm:.2f} s, exit 0 at {exited - sigterm:.2f} s (grace "
                  f"{GRACE_S} s); a request on a kept-alive connection: {late_outcome}; gRPC "
                  f"health watches (ext_proc, Pick): {watches}")
    finally:
        if router.returncode is None:
            router.kill()
            await asyncio.wait_for(router.wait(), 10)
        await fleet.stop()


@pytest.mark.parametrize("wait_ms", [0, 20_000])
async def test_a_prompt_whose_prefix_is_being_computed_waits_and_hits_the_cache(
        tmp_path: Path, model_dir: Path, wait_ms: int) -> None:
    """``scoring.prefillWaitMs`` on a real emulated engine with real KV events: two prompts of
    one context queue behind a long unrelated prefill. With the wait, the router holds the
    second until the first starts answering; without it (0) both reach the engine at once.
    Either way the engine serves the second's context from cache: as vLLM does, it caches a
    block when the step filling it is scheduled, so a copy admitted in the same step (or
    while the first is still prefilling in chunks) hits it rather than computing it again."""
    async with emulated_fleet(model_dir, count=1, time_scale=1.0) as fleet:
        docs = [fleet_pool(fleet), {
            "apiVersion": "kvroute.io/v1alpha1", "kind": "RoutePolicy",
            "metadata": {"name": "chat"},
            "spec": {"match": {"model": "chat"}, "pools": [{"name": "emu"}],
                     "scoring": {"scorers": [{"type": "prefix-precise", "weight": 0},
                                             {"type": "prefill-cost"}],
                                 "prefillWaitMs": wait_ms}}}]
        config = tmp_path / "router.yaml"
        config.write_text(yaml.safe_dump_all(docs))
        engine = fleet.slots[0].engine.sim
        async with running_router(config, model_dir) as (router, url), \
                aiohttp.ClientSession() as s:
            await eventually(lambda: all(st["trustworthy"] for pool in statuses(router).values()
                                         for st in pool), "the KV-event feed is live",
                             diagnose=lambda: statuses(router))
            (endpoint,) = router.datastore.endpoints()

            async def send(text: str) -> None:
                body = {"model": "chat", "prompt": text, "max_tokens": 2}
                async with asyncio.timeout(60), s.post(f"{url}/v1/completions",
                                                       json=body) as resp:
                    assert resp.status == 200, await resp.text()

            context = "shared context: " + "lorem ipsum " * 60  # ~740 tokens
            # ~1,900 unrelated tokens: one step of ~0.75 s that the next two queue behind.
            busy = asyncio.create_task(send("unrelated " * 190))
            await eventually(lambda: endpoint.in_flight == 1, "the long prompt was sent")
            first = asyncio.create_task(send(context + "first question?"))
            await eventually(lambda: endpoint.in_flight == 2, "the first prompt was sent")
            hits_before = engine.prefix_hits
            second = asyncio.create_task(send(context + "second question?"))
            await asyncio.gather(busy, first, second)
            hits = engine.prefix_hits - hits_before
            waits = router.metrics.registry.get_sample_value(
                "kvroute_prefill_waits_total", {"pool": "emu", "outcome": "answered"})
            assert waits == (1.0 if wait_ms else None)
            assert hits >= len(context) - 32  # the context's full blocks, from cache
            assert endpoint.in_flight == 0 and not endpoint.prefill_in_flight
