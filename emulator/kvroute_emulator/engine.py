"""One emulated engine in real time: the engine model's steps, slowed by a dilation factor.

:class:`EmulatedEngine` owns a :class:`~kvroute_emulator.model.engine.SimEngine` (the scheduler
the fleet simulator uses) and runs its steps on the event loop: plan a step, sleep for the
profile's step time multiplied by ``time_scale`` (wall seconds per emulated second) and any
slow-down fault, apply it, hand every request its new tokens, publish the step's KV events.
Latencies the engine reports (``/metrics`` histograms) are in emulated seconds; a client that
measures wall time divides by ``time_scale``. When the process cannot keep up, steps end late:
:attr:`EmulatedEngine.lag_s` adds up how late (emulated seconds), so a benchmark can say whether
its numbers are the model's or the machine's.

Faults (driven by the fleet's admin endpoint): :meth:`stall` (no steps until :meth:`resume`),
:meth:`slow_down`, event drop/garble shares (on the publisher), :meth:`kill` (requests in flight
fail, the port stops answering) and :meth:`restart` (empty cache, KV-event sequence from 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvroute_emulator.hashing import block_digests, event_hash
from kvroute_emulator.kvevents import KVEventPublisher
from kvroute_emulator.model.engine import DEFAULT_KV_ALLOCATION, SimEngine, SimRequest
from kvroute_emulator.model.profile import CostProfile
from kvroute_emulator.tokens import ServedModel

# vLLM's bucket bounds (seconds) for the histograms the emulator exposes.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class EngineUnavailableError(RuntimeError):
    """The engine is killed (or restarting): what a client sees as a refused connection."""


@dataclass
class Histogram:
    """A Prometheus histogram's state: cumulative bucket counts come from ``counts``."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += value
        self.count += 1


@dataclass
class Generation:
    """One request inside an emulated engine, as its HTTP handler follows it."""

    sim: SimRequest
    prompt_ids: list[int]
    output_ids: list[int]
    hashes: list[int]
    """Every full block's hash the request fills, its prompt's then its output's."""
    updates: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    delivered: int = 0
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """Counters for ``/metrics``."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    success: dict[str, int] = field(default_factory=lambda: {"length": 0, "stop": 0,
                                                             "abort": 0})
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    queue: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))


class EmulatedEngine:
    """An engine model running in dilated real time, with vLLM's outputs and faults."""

    def __init__(self, index: int, profile: CostProfile, model: ServedModel,
                 time_scale: float, publisher_factory: Callable[[], KVEventPublisher], *,
                 scheduling_policy: str = "fcfs",
                 kv_allocation: str = DEFAULT_KV_ALLOCATION) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0 (wall seconds per emulated second)")
        self.index = index
        self.profile = profile
        self.model = model
        self.time_scale = time_scale
        self.scheduling_policy = scheduling_policy
        self.kv_allocation = kv_allocation
        self._publisher_factory = publisher_factory
        self.sim = SimEngine(index, profile, scheduling_policy=scheduling_policy,
                             kv_allocation=kv_allocation)
        self.publisher: KVEventPublisher | None = publisher_factory()
        self.stats = EngineStats()
        self.generations: dict[int, Generation] = {}
        self.slowdown = 1.0
        self.metrics_delay_s = 0.0
        """Wall seconds ``/metrics`` waits before answering (the ``metrics`` fault)."""
        self.alive = True
        self.lag_s = 0.0
        self.steps = 0
        self._ids = itertools.count()
        self._block_info: dict[int, tuple[int | None, list[int]]] = {}
        self._block_refs: dict[int, int] = {}
        self._aborts: list[Generation] = []
        self._wake = asyncio.Event()
        self._running = asyncio.Event()
        self._running.set()
        self._t0 = time.monotonic()
        self._loop_task: asyncio.Task[None] | None = None
        self._replay_task: asyncio.Task[None] | None = None

    # --- clock ---------------------------------------------------------------------------

    def now(self) -> float:
        """Emulated seconds since the engine started."""
        return (time.monotonic() - self._t0) / self.time_scale

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._step_loop())
        if self.publisher is not None:
            self._replay_task = asyncio.get_running_loop().create_task(
                self.publisher.serve_replay())

    async def stop(self) -> None:
        for task in (self._loop_task, self._replay_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop_task = self._replay_task = None
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None

    async def kill(self) -> None:
        """Die as a crashed engine does: every request in flight fails, events stop."""
        self.alive = False
        for gen in list(self.generations.values()):
            gen.finish_reason = gen.finish_reason or "killed"
            gen.updates.put_nowait("killed")
        self.generations.clear()
        await self.stop()

    async def restart(self) -> None:
        """Come back empty: new scheduler state, KV-event sequence from 0, counters reset."""
        if self.alive:
            await self.kill()
        self.sim = SimEngine(self.index, self.profile, scheduling_policy=self.scheduling_policy,
                             kv_allocation=self.kv_allocation)
        self.stats = EngineStats()
        self._block_info.clear()
        self._block_refs.clear()
        self._aborts.clear()
        self.slowdown = 1.0
        self.metrics_delay_s = 0.0
        self._running.set()
        self.publisher = self._publisher_factory()
        self.publisher.restart()
        self.alive = True
        self._t0 = time.monotonic()
        self.start()

    def stall(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()
        self._wake.set()

    def slow_down(self, factor: float) -> None:
        if factor <= 0:
            raise ValueError("factor must be > 0")
        self.slowdown = factor

    @property
    def stalled(self) -> bool:
        return not self._running.is_set()

    # --- requests ------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], max_tokens: int, priority: int = 0) -> Generation:
        if not self.alive:
            raise EngineUnavailableError(f"engine {self.index} is down")
        request_id = next(self._ids)
        output_ids = self.model.output_tokens(len(prompt_ids) + request_id, max_tokens)
        # Every block the request will fill: the prompt's, then those of its output, whose
        # last token's KV is never computed (vLLM caches and announces output blocks too).
        sequence = prompt_ids + output_ids[:max(0, max_tokens - 1)]
        bs = self.profile.block_size
        hashes = [event_hash(d) for d in block_digests(sequence, bs)]
        parent: int | None = None
        for i, h in enumerate(hashes):
            if h not in self._block_info:
                self._block_info[h] = (parent, sequence[i * bs:(i + 1) * bs])
            self._block_refs[h] = self._block_refs.get(h, 0) + 1
            parent = h
        prompt_blocks = len(prompt_ids) // bs
        sim = SimRequest(id=request_id, arrival_s=self.now(), prompt_tokens=len(prompt_ids),
                         max_tokens=max_tokens, hashes=hashes[:prompt_blocks], priority=priority,
                         output_hashes=hashes[prompt_blocks:])
        gen = Generation(sim=sim, prompt_ids=prompt_ids, output_ids=output_ids, hashes=hashes)
        self.generations[request_id] = gen
        self.sim.enqueue(sim)
        self._wake.set()
        return gen

    def abort(self, gen: Generation) -> None:
        """The client went away: free the request at the next step boundary."""
        if gen.done or gen.sim.id not in self.generations:
            return
        self._aborts.append(gen)
        self._wake.set()

    def _release(self, gen: Generation) -> None:
        self.generations.pop(gen.sim.id, None)
        for h in gen.hashes:
            left = self._block_refs.get(h, 0) - 1
            if left <= 0:
                self._block_refs.pop(h, None)
                self._block_info.pop(h, None)
            else:
                self._block_refs[h] = left

    def reset_prefix_cache(self) -> bool:
        if not self.sim.clear_cache():
            return False
        if self.publisher is not None:
            task = asyncio.get_running_loop().create_task(
                self.publisher.publish([{"type": "AllBlocksCleared"}]))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        return True

    # --- the step loop -------------------------------------------------------------------

    def _apply_aborts(self) -> None:
        for gen in self._aborts:
            if not gen.done and self.sim.abort(gen.sim):
                gen.finish_reason = "abort"
                self.stats.success["abort"] += 1
                gen.updates.put_nowait("done")
            self._release(gen)
        self._aborts.clear()

    async def _step_loop(self) -> None:
        while True:
            await self._running.wait()
            self._apply_aborts()
            plan = self.sim.plan_step(self.now())
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            emulated = self.sim.step_duration(plan) * self.slowdown
            planned_end = time.monotonic() + emulated * self.time_scale
            await asyncio.sleep(emulated * self.time_scale)
            late = time.monotonic() - planned_end
            if late > 0:
                self.lag_s += late / self.time_scale
            now = self.now()
            touched = [r for r, _ in plan.prefill] + plan.decode
            self.sim.finish_step(plan, now)
            self.steps += 1
            finished: list[Generation] = []
            for r in touched:
                gen = self.generations.get(r.id)
                if gen is None:
                    continue
                if r.first_token_s is not None and gen.delivered == 0 and r.generated > 0:
                    self.stats.ttft.observe(r.first_token_s - r.arrival_s)
                    self.stats.prompt_tokens += r.prompt_tokens
                if r.generated > gen.delivered:
                    self.stats.generation_tokens += r.generated - gen.delivered
                    gen.delivered = r.generated
                    if r.done_s is not None:
                        gen.finish_reason = "length"
                        self.stats.success["length"] += 1
                        self.stats.e2e.observe(r.done_s - r.arrival_s)
                        if r.admitted_s is not None:
                            self.stats.queue.observe(r.admitted_s - r.arrival_s)
                        finished.append(gen)
                    gen.updates.put_nowait("tokens")
            # Publish before releasing: a request that ends in the step that stored its last
            # blocks still holds their parents and token ids.
            await self._publish(self.sim.drain_events())
            for gen in finished:
                self._release(gen)

    async def _publish(self, raw: list[dict[str, Any]]) -> None:
        if not raw or self.publisher is None:
            return
        events: list[dict[str, Any]] = []
        for event in raw:
            if event["type"] == "BlockRemoved":
                events.append({"type": "BlockRemoved", "block_hashes": event["block_hashes"],
                               "medium": "GPU"})
                continue
            # One BlockStored per chain, as vLLM sends one per request's newly full blocks.
            run: list[int] = []
            for h in event["block_hashes"]:
                parent, _ = self._block_info.get(h, (None, []))
                if run and parent != run[-1]:
                    events.append(self._stored(run))
                    run = []
                run.append(h)
            if run:
                events.append(self._stored(run))
        await self.publisher.publish(events)

    def _stored(self, hashes: list[int]) -> dict[str, Any]:
        parent = self._block_info.get(hashes[0], (None, []))[0]
        tokens: list[int] = []
        for h in hashes:
            tokens.extend(self._block_info.get(h, (None, []))[1])
        return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
                "token_ids": tokens, "block_size": self.profile.block_size, "lora_id": None,
                "medium": "GPU", "lora_name": None, "extra_keys": [None] * len(hashes),
                "group_idx": 0, "kv_cache_spec_kind": "full_attention"}

    # --- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {"index": self.index, "alive": self.alive, "stalled": self.stalled,
                "slowdown": self.slowdown, "metrics_delay_s": self.metrics_delay_s,
                "running": len(self.sim.running),
                "waiting": len(self.sim.waiting), "steps": self.steps,
                "lag_s": round(self.lag_s, 6),
                "kv_seq": self.publisher.seq if self.publisher else None,
                "prefix_cache_queries": self.sim.prefix_queries,
                "prefix_cache_hits": self.sim.prefix_hits}
