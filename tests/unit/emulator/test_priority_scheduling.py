"""vLLM's ``--scheduling-policy priority``: the engine model admits waiting requests in
(priority, arrival) order, the HTTP engines read ``priority`` (and ``X-Vllm-Priority``) from
completion and chat bodies, and fcfs — the default, the fleet simulator's — is unchanged.

Orders are forced, never timed: the engines run one sequence at a time (``max_num_seqs`` 1) and
are stalled while the queue fills, so who is admitted first decides who finishes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kvroute_cli.main import build_parser
from kvroute_emulator.cli import config_from_args
from kvroute_emulator.fleet import EmulatedFleet, FleetConfig
from kvroute_emulator.model.engine import SimEngine, SimRequest, block_hashes
from kvroute_emulator.model.profile import CostProfile, cpu_test_engine

from tests.emulated import MODEL

BOUND_S = 30.0  # detects a hang; never a performance threshold
ONE_AT_A_TIME = CostProfile(name="test", prefill_s_per_token=0.001, step_base_s=0.01,
                            decode_step_s_by_batch={1: 0.01}, max_num_seqs=1,
                            max_batched_tokens=64, block_size=4, kv_blocks=40)


def request(rid: int, priority: int = 0, at: float | None = None) -> SimRequest:
    tokens = bytes([65 + rid]) * 8
    return SimRequest(id=rid, arrival_s=float(rid) if at is None else at,
                      prompt_tokens=len(tokens), max_tokens=2,
                      hashes=block_hashes(tokens, ONE_AT_A_TIME.block_size),
                      priority=priority)


def admission_order(engine: SimEngine, requests: list[SimRequest]) -> list[int]:
    """Enqueue ``requests`` (in list order) while nothing runs, run to idle, and list the ids
    in the order the steps admitted them (a step's newly admitted prefills come in order)."""
    for r in requests:
        engine.enqueue(r)
    admitted: list[int] = []
    now = 10.0  # after every arrival
    for _ in range(1000):
        plan = engine.plan_step(now)
        if plan is None:
            break
        admitted += [r.id for r, _ in plan.prefill if r.id not in admitted]
        now += engine.step_duration(plan)
        engine.finish_step(plan, now)
    assert not engine.waiting and not engine.running
    return admitted


# --- the engine model ---------------------------------------------------------------------

def test_a_lower_priority_value_enqueued_later_is_admitted_first() -> None:
    engine = SimEngine(0, ONE_AT_A_TIME, scheduling_policy="priority")
    assert admission_order(engine, [request(1, priority=0), request(2, priority=-1),
                                    request(3, priority=5), request(4, priority=0)]
                           ) == [2, 1, 4, 3]


def test_equal_priorities_go_by_arrival_then_id() -> None:
    engine = SimEngine(0, ONE_AT_A_TIME, scheduling_policy="priority")
    late, early = request(1, priority=2, at=1.0), request(2, priority=2, at=0.5)
    same_a, same_b = request(4, priority=2, at=2.0), request(3, priority=2, at=2.0)
    assert admission_order(engine, [late, early, same_a, same_b]) == [2, 1, 3, 4]


def test_fcfs_ignores_priority_and_keeps_its_timeline() -> None:
    """The default policy admits in enqueue order whatever the priorities, with the very same
    step timeline as requests without any (the fleet simulator's results do not move)."""
    timelines = []
    for priorities in ([0, 0, 0, 0], [3, -1, 7, 0]):
        engine = SimEngine(0, dataclasses.replace(ONE_AT_A_TIME, max_num_seqs=2))
        reqs = [request(i + 1, priority=p) for i, p in enumerate(priorities)]
        assert admission_order(engine, reqs) == [1, 2, 3, 4]
        timelines.append([(r.admitted_s, r.first_token_s, r.done_s) for r in reqs])
    assert timelines[0] == timelines[1]


def test_a_higher_priority_arrival_waits_for_the_running_sequence() -> None:
    """No preemption: capacity is reserved up front, so a running sequence keeps its place."""
    engine = SimEngine(0, ONE_AT_A_TIME, scheduling_policy="priority")
    running = request(1, priority=10)
    engine.enqueue(running)
    plan = engine.plan_step(1.0)
    assert plan is not None and engine.running == [running]
    urgent = request(2, priority=-10)
    engine.enqueue(urgent)
    engine.finish_step(plan, 2.0)
    plan = engine.plan_step(2.0)
    assert plan is not None and engine.running == [running] and list(engine.waiting) == [urgent]


def test_abort_keeps_the_priority_order_of_the_rest() -> None:
    engine = SimEngine(0, ONE_AT_A_TIME, scheduling_policy="priority")
    reqs = [request(1, priority=3), request(2, priority=1), request(3, priority=2)]
    for r in reqs:
        engine.enqueue(r)
    assert [r.id for r in engine.waiting] == [2, 3, 1]
    assert engine.abort(reqs[2])
    engine.enqueue(request(4, priority=2))
    assert [r.id for r in engine.waiting] == [2, 4, 1]
    assert engine.metrics()["vllm:num_requests_waiting"] == 3.0


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="fcfs or priority"):
        SimEngine(0, ONE_AT_A_TIME, scheduling_policy="lifo")
    config = FleetConfig(count=1, profile=cpu_test_engine(), model_dir=Path(),
                         served_model_name=MODEL, scheduling_policy="lifo")
    with pytest.raises(ValueError, match="scheduling_policy"):
        config.check()


def test_scheduling_policy_option_reaches_the_fleet_config(model_dir: Path) -> None:
    args = build_parser().parse_args(["engines", "--emulate", "--scheduling-policy",
                                      "priority"])
    args.model_dir, args.served_model_name = str(model_dir), "m"
    assert config_from_args(args).scheduling_policy == "priority"
    args = build_parser().parse_args(["engines", "--emulate"])
    args.model_dir, args.served_model_name = str(model_dir), "m"
    assert config_from_args(args).scheduling_policy == "fcfs"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["engines", "--emulate", "--scheduling-policy", "lifo"])


# --- the HTTP engines -----------------------------------------------------------------------

@contextlib.asynccontextmanager
async def _fleet(model_dir: Path, policy: str) -> AsyncIterator[EmulatedFleet]:
    """One engine running one sequence at a time, 100x faster than the CPU profile."""
    fleet = EmulatedFleet(FleetConfig(
        count=1, profile=dataclasses.replace(cpu_test_engine(), max_num_seqs=1),
        model_dir=model_dir, served_model_name=MODEL, time_scale=0.01,
        scheduling_policy=policy))
    await fleet.start()
    try:
        yield fleet
    finally:
        await fleet.stop()


@pytest.fixture
async def priority_fleet(model_dir: Path) -> AsyncIterator[EmulatedFleet]:
    async with _fleet(model_dir, "priority") as fleet:
        yield fleet


@pytest.fixture
async def fcfs_fleet(model_dir: Path) -> AsyncIterator[EmulatedFleet]:
    async with _fleet(model_dir, "fcfs") as fleet:
        yield fleet


async def _admin(s: aiohttp.ClientSession, fleet: EmulatedFleet, action: str) -> None:
    async with s.post(f"http://127.0.0.1:{fleet.admin_port}/engines/0/{action}") as r:
        assert r.status == 200, await r.text()


async def _waiting(s: aiohttp.ClientSession, fleet: EmulatedFleet) -> int:
    async with s.get(f"http://127.0.0.1:{fleet.admin_port}/engines") as r:
        return int((await r.json())[0]["waiting"])


# (label, path, body priority, X-Vllm-Priority header), sent in this order.
REQUESTS: list[tuple[str, str, int | None, str | None]] = [
    ("a", "/v1/completions", 5, None),
    ("b", "/v1/completions", 1, None),
    ("c", "/v1/chat/completions", 3, None),
    ("d", "/v1/completions", 9, "1"),  # the header overrides the body, as vLLM's does
    ("e", "/v1/chat/completions", 4, "urgent"),  # not an integer: ignored, the body counts
    ("f", "/v1/completions", None, None),  # no priority: 0
]


async def _finish_order(fleet: EmulatedFleet) -> list[str]:
    """Stall the engine, queue :data:`REQUESTS` one after another, resume: the labels in the
    order their answers completed (one sequence runs at a time, so admission decides it)."""
    url = fleet.endpoints()[0]["url"]
    finished: list[str] = []

    async def send(s: aiohttp.ClientSession, label: str, path: str, priority: int | None,
                   header: str | None) -> None:
        body: dict[str, Any] = {"model": MODEL, "max_tokens": 4, "ignore_eos": True}
        if path == "/v1/completions":
            body["prompt"] = f"request {label} " * 8
        else:
            body["messages"] = [{"role": "user", "content": f"request {label} " * 8}]
        if priority is not None:
            body["priority"] = priority
        headers = {"X-Vllm-Priority": header} if header is not None else {}
        async with s.post(f"{url}{path}", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            await r.read()
        finished.append(label)

    async with aiohttp.ClientSession() as s, asyncio.timeout(BOUND_S):
        await _admin(s, fleet, "stall")
        tasks = []
        for i, spec in enumerate(REQUESTS):
            tasks.append(asyncio.create_task(send(s, *spec)))
            for _ in range(100_000):  # the next is sent once this one waits: a known order
                if await _waiting(s, fleet) == i + 1:
                    break
                await asyncio.sleep(0.005)
        await _admin(s, fleet, "resume")
        await asyncio.gather(*tasks)
    return finished


async def test_priority_engine_serves_lower_priority_values_first(
        priority_fleet: EmulatedFleet) -> None:
    assert await _finish_order(priority_fleet) == ["f", "b", "d", "c", "e", "a"]


async def test_fcfs_engine_accepts_priority_and_serves_in_arrival_order(
        fcfs_fleet: EmulatedFleet) -> None:
    assert await _finish_order(fcfs_fleet) == ["a", "b", "c", "d", "e", "f"]


async def test_invalid_priority_is_a_400_naming_it(fleet: EmulatedFleet) -> None:
    url = fleet.endpoints()[0]["url"]
    async with aiohttp.ClientSession() as s:
        for path, base in (("/v1/completions", {"prompt": "x"}),
                           ("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "x"}]})):
            for value in ("high", 1.5, True, None, [1], 2**63, -(2**63) - 1):
                async with s.post(f"{url}{path}", json={
                        "model": MODEL, "max_tokens": 1, **base, "priority": value}) as r:
                    answer = await r.json()
                    assert r.status == 400, (path, value, answer)
                assert answer["error"]["param"] == "priority", (path, value, answer)
                assert answer["error"]["code"] == 400 and "priority" in answer["error"]["message"]
            for value in (7, -3, 2**63 - 1, -(2**63)):  # fcfs accepts and ignores any int64
                async with s.post(f"{url}{path}", json={
                        "model": MODEL, "max_tokens": 1, **base, "priority": value}) as r:
                    assert r.status == 200, (path, value, await r.text())
