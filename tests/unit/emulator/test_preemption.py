"""On-demand KV allocation (``--kv-allocation on-demand``): the engine model takes a step's
blocks as it fills them and, as vLLM's scheduler does, preempts a running sequence when none
are left — the newest admitted under fcfs, the lowest priority under priority. The preempted
sequence is prefilled again (prompt and generated tokens) and still finishes whole.

Orders and counts are forced by tiny KV capacities, never timed.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import aiohttp
import pytest
from kvroute_cli.main import build_parser
from kvroute_emulator.cli import config_from_args
from kvroute_emulator.fleet import EmulatedFleet, FleetConfig
from kvroute_emulator.model.engine import SimEngine, SimRequest, StepPlan, block_hashes
from kvroute_emulator.model.profile import CostProfile, cpu_test_engine

from tests.emulated import MODEL

BOUND_S = 60.0  # detects a hang; never a performance threshold
# 4-token blocks, 12 of them: two requests of 8 prompt + 16 output tokens (6 blocks each when
# done) fit together only just; three do not.
TIGHT = CostProfile(name="test", prefill_s_per_token=0.001, step_base_s=0.01,
                    decode_step_s_by_batch={1: 0.01}, max_num_seqs=8,
                    max_batched_tokens=64, block_size=4, kv_blocks=12)


def request(rid: int, priority: int = 0, prompt: int = 8, max_tokens: int = 16) -> SimRequest:
    tokens = bytes([65 + rid]) * prompt
    return SimRequest(id=rid, arrival_s=float(rid), prompt_tokens=prompt,
                      max_tokens=max_tokens, hashes=block_hashes(tokens, TIGHT.block_size),
                      priority=priority)


class Replay:
    """Runs an engine to idle, checking after every step that its block accounting adds up
    and that the KV events it published name exactly the blocks it holds."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.resident: set[int] = set()
        self.now = 100.0
        self.admitted: list[int] = []

    def check(self) -> None:
        e = self.engine
        for event in e.drain_events():
            blocks = set(event["block_hashes"])
            if event["type"] == "BlockStored":
                assert not blocks & self.resident, "stored twice without a removal"
                self.resident |= blocks
            else:
                assert blocks <= self.resident, "removed a block never published as stored"
                self.resident -= blocks
        assert self.resident == set(e.refcount), "the events disagree with the cache"
        assert e.pinned == sum(1 for n in e.refcount.values() if n > 0)
        assert e.reserved == sum(r.allocated - len(r.blocks) for r in e.running)
        assert len(e.refcount) + e.reserved <= e.profile.kv_blocks, "over capacity"

    def step(self) -> StepPlan | None:
        # vLLM walks its running list in order; the model schedules every decode first. The
        # two agree because a prefill only stops mid-prompt when the step's budget runs out,
        # after which nothing else is admitted: at most one running request is mid-prefill,
        # and it is the last.
        running = self.engine.running
        mid = [i for i, r in enumerate(running) if r.computed < r.prefill_len]
        assert mid in ([], [len(running) - 1]), f"mid-prefill at {mid} of {len(running)}"
        plan = self.engine.plan_step(self.now)
        if plan is None:
            return None
        self.admitted += [r.id for r, _ in plan.prefill]
        self.engine.events.extend(plan.events)  # published now, so the check can see them
        plan.events = []
        self.check()
        self.now += self.engine.step_duration(plan)
        self.engine.finish_step(plan, self.now)
        self.check()
        return plan

    def run(self, steps: int = 10_000) -> None:
        for _ in range(steps):
            if self.step() is None:
                break
        assert not self.engine.waiting and not self.engine.running, "did not finish"


def test_reserve_admits_one_at_a_time_where_on_demand_admits_both() -> None:
    """With room for one request's prompt and output, reserve runs them one after the other;
    on demand admits both and preempts the newer when decoding runs out of blocks."""
    small = CostProfile(**{**TIGHT.__dict__, "kv_blocks": 8})
    for allocation, first_step, preempted in (("reserve", [0], 0), ("on-demand", [0, 1], 1)):
        engine = SimEngine(0, small, kv_allocation=allocation)
        requests = [request(0), request(1)]
        for r in requests:
            engine.enqueue(r)
        replay = Replay(engine)
        plan = replay.step()
        assert plan is not None
        assert [r.id for r, _ in plan.prefill] == first_step, allocation
        replay.run()
        assert engine.preemptions == preempted, allocation
        assert [r.preemptions for r in requests] == [0, preempted], allocation
        assert all(r.generated == r.max_tokens and r.done_s is not None for r in requests)


def test_fcfs_preempts_the_newest_and_it_resumes_first() -> None:
    engine = SimEngine(0, TIGHT, kv_allocation="on-demand")
    requests = [request(i) for i in range(3)]
    for r in requests:
        engine.enqueue(r)
    replay = Replay(engine)
    replay.run()
    assert requests[0].preemptions == 0, "the oldest is never the victim under fcfs"
    assert requests[1].preemptions == 0, "preempting the newest left room for it"
    assert requests[2].preemptions >= 1
    assert engine.preemptions == sum(r.preemptions for r in requests)


def test_priority_preempts_the_lowest_priority_even_if_admitted_first() -> None:
    engine = SimEngine(0, TIGHT, scheduling_policy="priority", kv_allocation="on-demand")
    low, high_a, high_b = request(0, priority=9), request(1, priority=0), request(2, priority=0)
    for r in (low, high_a, high_b):
        engine.enqueue(r)
    replay = Replay(engine)
    replay.step()  # all three start (their first chunks fit)
    assert [r.id for r in engine.running] == [1, 2, 0]
    replay.run()
    assert low.preemptions >= 1 and high_a.preemptions == 0 and high_b.preemptions == 0
    assert low.done_s is not None and high_a.done_s is not None and high_b.done_s is not None
    assert low.done_s > max(high_a.done_s, high_b.done_s) > 0


def test_a_resumed_request_reuses_what_is_still_cached_and_keeps_its_first_token() -> None:
    """Preempted after its first tokens, a request is prefilled again from its prompt and
    generated tokens; its blocks stayed cached, so the resume hits them and computes little.
    Its TTFT and the prefix-cache counters are those of its first admission."""
    engine = SimEngine(0, TIGHT, kv_allocation="on-demand")
    requests = [request(i) for i in range(3)]
    for r in requests:
        engine.enqueue(r)
    replay = Replay(engine)
    victim = requests[2]
    first_token = None
    resumed_from = None
    for _ in range(1000):
        before = victim.preemptions
        if replay.step() is None:
            break
        if first_token is None:
            first_token = victim.first_token_s
        if victim.preemptions > before and resumed_from is None:
            resumed_from = victim.generated
    assert resumed_from is not None and resumed_from > 0, "preempted while decoding"
    assert victim.first_token_s == first_token
    assert victim.cached_tokens == 0, "its first admission found nothing cached"
    assert engine.prefix_queries == sum(r.prompt_tokens for r in requests)
    assert victim.prefill_len == victim.prompt_tokens + resumed_from
    assert victim.generated == victim.max_tokens


@pytest.mark.parametrize(("policy", "allocation"), [("fcfs", "on-demand"),
                                                    ("priority", "on-demand"),
                                                    ("fcfs", "reserve"),
                                                    ("priority", "reserve")])
def test_random_load_keeps_blocks_and_events_consistent(policy: str, allocation: str) -> None:
    """Bounded random workloads (sharing prefixes, mixed lengths and priorities, arrivals
    between steps, aborts): every request finishes with all its tokens, the KV events always
    match the cache, an idle engine holds no running blocks, and the step order is vLLM's."""
    rng = random.Random(7)
    for trial in range(30):
        profile = CostProfile(**{**TIGHT.__dict__, "kv_blocks": rng.randint(12, 40),
                                 "max_batched_tokens": rng.choice([8, 16, 64])})
        engine = SimEngine(0, profile, scheduling_policy=policy, kv_allocation=allocation)
        replay = Replay(engine)
        pending: list[SimRequest] = []
        for rid in range(rng.randint(3, 12)):
            shared = bytes([65 + rng.randint(0, 2)]) * rng.choice([0, 8, 16])
            tokens = shared + bytes([97 + rid % 26]) * rng.randint(1, 12)
            pending.append(SimRequest(
                id=rid, arrival_s=float(rid), prompt_tokens=len(tokens),
                max_tokens=rng.randint(1, 16), priority=rng.randint(0, 3),
                hashes=block_hashes(tokens, profile.block_size)))
        aborted: set[int] = set()
        for _ in range(5000):
            if pending and rng.random() < 0.5:
                engine.enqueue(pending.pop(0))
            if rng.random() < 0.02 and engine.running:
                victim = rng.choice(engine.running)
                assert engine.abort(victim)
                aborted.add(victim.id)
                replay.check()
            if replay.step() is None and not pending:
                break
        assert not engine.waiting and not engine.running, f"trial {trial} did not finish"
        assert engine.reserved == 0 and engine.pinned == 0
        assert engine.finished + len(aborted) == rid + 1, f"trial {trial}"


def test_kv_allocation_option_reaches_the_fleet_config(model_dir: Path) -> None:
    args = build_parser().parse_args(["engines", "--emulate", "--kv-allocation", "on-demand"])
    args.model_dir, args.served_model_name = str(model_dir), "m"
    assert config_from_args(args).kv_allocation == "on-demand"
    args = build_parser().parse_args(["engines", "--emulate"])
    args.model_dir, args.served_model_name = str(model_dir), "m"
    assert config_from_args(args).kv_allocation == "on-demand", "vLLM's allocation by default"
    with pytest.raises(ValueError, match="unknown KV allocation"):
        SimEngine(0, TIGHT, kv_allocation="lazy")


async def _preemptions(s: aiohttp.ClientSession, url: str) -> float:
    async with s.get(f"{url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("vllm:num_preemptions_total{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vllm:num_preemptions_total on /metrics")


@pytest.mark.parametrize("allocation", ["reserve", "on-demand"])
async def test_a_preempted_stream_still_delivers_every_token(model_dir: Path,
                                                             allocation: str) -> None:
    """Over HTTP: two streams that together outgrow the KV cache. On demand the newer is
    preempted and resumed — its stream pauses, then delivers all its tokens, and /metrics
    counts the preemption; reserved, the second waits and nothing is preempted."""
    profile = CostProfile(**{**cpu_test_engine().__dict__, "block_size": 16, "kv_blocks": 16})
    fleet = EmulatedFleet(FleetConfig(count=1, profile=profile, model_dir=model_dir,
                                      served_model_name=MODEL, time_scale=0.01,
                                      max_model_len=256, kv_allocation=allocation))
    await fleet.start()
    try:
        url = fleet.endpoints()[0]["url"]

        async def stream(s: aiohttp.ClientSession, label: str) -> int:
            body = {"model": MODEL, "prompt": f"request {label} " * 4, "max_tokens": 150,
                    "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            tokens = 0
            async with s.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                async for raw in r.content:
                    line = raw.decode().strip()
                    if line.startswith("data: {"):
                        usage = json.loads(line[len("data: "):]).get("usage")
                        tokens = usage["completion_tokens"] if usage else tokens
            return tokens

        async with aiohttp.ClientSession() as s:
            counts = await asyncio.wait_for(
                asyncio.gather(stream(s, "a"), stream(s, "b")), BOUND_S)
            assert list(counts) == [150, 150]
            preempted = await _preemptions(s, url)
        assert (preempted >= 1) if allocation == "on-demand" else preempted == 0
    finally:
        await fleet.stop()
