"""The simulated fleet's event loop: arrivals, routing decisions, engine steps.

Time is simulated (no sleeping): a heap holds arrivals, step completions and (for a picker
that models scraping) metrics scrapes. Nothing scans the fleet per event: an engine is looked
at when its own step ends or a request is sent to it, and KV events are collected only from
engines that stepped since the previous decision. At an arrival
the :class:`Picker` chooses an engine from the engines' current metrics (and, for a
prefix-aware picker, the KV events they have published so far); an idle engine with work
plans a step and schedules its completion. The picker is the seam where the router's own
scheduling code plugs in (``docs/benchmarks/README.md``, "Fleet simulator"); the simulator
ships only round-robin, the baseline, and a group-affinity reference that is told each
request's tenant; :mod:`~kvroute_bench.sim.router_picker` runs kvroute's
own scheduler profile, so no routing policy is re-implemented here.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from kvroute_emulator.model.engine import (
    DEFAULT_KV_ALLOCATION,
    SimEngine,
    SimRequest,
    StepPlan,
    block_hashes,
)
from kvroute_emulator.model.profile import CostProfile

from kvroute_bench.workloads import TraceRequest


class Picker(Protocol):
    """Chooses an engine for a request; sees every engine's KV events before each decision.

    Optional: a picker with ``scrape_interval_s`` > 0 and ``scrape(engines, now)`` is called
    every ``scrape_interval_s`` of simulated time (from the first arrival), to take the
    metrics snapshot its decisions see until the next one (the router's scrape loop)."""

    def observe(self, engine: int, events: list[dict[str, Any]]) -> None: ...

    def pick(self, request: SimRequest, engines: Sequence[SimEngine]) -> int: ...


class RoundRobinPicker:
    """The baseline: engines in turn, blind to caches and load."""

    def __init__(self) -> None:
        self._next = 0

    def observe(self, engine: int, events: list[dict[str, Any]]) -> None:
        return None

    def pick(self, request: SimRequest, engines: Sequence[SimEngine]) -> int:
        choice = self._next % len(engines)
        self._next += 1
        return choice


class GroupAffinityPicker:
    """A reference, not a router: it is told each request's trace group (a tenant, a
    document) and sends every request of a group to one engine, groups dealt to the engines in
    turn as they first appear. Perfect stickiness with evenly spread groups, blind to load: the
    hit rate a router that never moves a tenant reaches, which shows what the engines' finite
    caches cost by themselves (``recomputed["evicted"]``)."""

    def __init__(self, groups: dict[int, str]) -> None:
        self._groups = groups  # request id -> group
        self._engine: dict[str, int] = {}

    def observe(self, engine: int, events: list[dict[str, Any]]) -> None:
        return None

    def pick(self, request: SimRequest, engines: Sequence[SimEngine]) -> int:
        group = self._groups.get(request.id, f"request-{request.id}")
        return self._engine.setdefault(group, len(self._engine) % len(engines))


@dataclass(frozen=True)
class SimResult:
    """What a simulated run measured, in the shape of the real benchmark's numbers."""

    requests: int
    unfinished: int
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    output_tokens_per_s: float
    prefix_hit_rate: float
    requests_per_engine: list[int]
    simulated_s: float
    goodput_per_s: float = math.nan
    """Counted requests whose TTFT met the objective (``slo_ttft_s``), per second of the
    counted span (first arrival to last completion): the fleet bench's goodput."""
    slo_attainment: float = math.nan
    """The share of the counted requests whose TTFT met the objective."""
    recomputed: dict[str, float] = field(default_factory=dict)
    """Prompt tokens computed although the oracle would have hit them, as shares of all
    prompt tokens, by cause (:func:`recompute_breakdown`)."""
    placement: dict[str, float] = field(default_factory=dict)
    """Where the picker sent each counted request against what the engines held at that
    moment, as shares of the counted requests, by :data:`PLACEMENT_CLASSES`."""
    preempted: int = 0
    """Counted requests the engines preempted at least once (only with on-demand KV
    allocation; a preempted request is prefilled again)."""


def to_sim_requests(trace: Sequence[TraceRequest], block_size: int, keep_text: bool = False,
                    hash_blocks: bool = True) -> list[SimRequest]:
    """The trace as simulator requests. ``hash_blocks=False`` leaves ``hashes`` empty for a
    picker that sets them at its decision (the KV-event picker hashes with the router's
    vLLM-compatible hasher)."""
    return [SimRequest(id=r.index, arrival_s=r.arrival_s, prompt_tokens=r.prompt_tokens,
                       max_tokens=r.max_tokens,
                       hashes=block_hashes(r.prompt.encode(), block_size) if hash_blocks
                       else [],
                       prompt=r.prompt if keep_text else "") for r in trace]


def measured_ids(requests: Sequence[SimRequest], warmup: int) -> set[int]:
    """The ids of ``requests`` from the ``warmup``-th arrival on (arrival order, ties by
    position): what a run with a continuous warm-up of ``warmup`` requests reports."""
    order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i))
    return {requests[i].id for i in order[warmup:]}


PLACEMENT_CLASSES = ("on_holder", "left_holder", "held_nowhere")
"""Where a request went, judged against the engines' caches (not the picker's view) when it
was routed, by the longest run of the prompt's leading blocks each engine holds:

* ``on_holder``: the chosen engine holds the longest such run (some blocks);
* ``left_holder``: another engine holds a longer run than the chosen one — a spill for load,
  or a holder the picker did not know of;
* ``held_nowhere``: no engine holds the prompt's first block — evicted everywhere, never
  computed, or not yet scheduled (a block counts from the step that schedules it, as the
  engine shares it from then).

It tells a picker that leaves holders (placement) from a fleet that no longer holds the
contexts (capacity): the second is no routing decision's doing at the time it is made."""


def placement_class(engines: Sequence[SimEngine], chosen: int, hashes: Sequence[int]) -> str:
    """The :data:`PLACEMENT_CLASSES` entry for a request with block ``hashes`` sent to
    engine ``chosen``."""
    runs = [engine.held_blocks(hashes) for engine in engines]
    best = max(runs, default=0)
    if best == 0:
        return "held_nowhere"
    return "on_holder" if runs[chosen] == best else "left_holder"


def simulate(requests: Sequence[SimRequest], pods: int, profile: CostProfile, picker: Picker,
             max_simulated_s: float = 86_400.0, scheduling_policy: str = "fcfs",
             kv_allocation: str = DEFAULT_KV_ALLOCATION,
             warmup: int = 0, scrape_phase: float = 0.0,
             slo_ttft_s: float = 1.0) -> SimResult:
    """Run ``requests`` through ``pods`` engines of ``profile`` (admitting waiting requests by
    ``scheduling_policy``, vLLM's, and allocating KV blocks by ``kv_allocation``); stops at
    ``max_simulated_s``. The first ``warmup`` arrivals run like the rest but are left out of
    the result (a continuous warm-up: latencies, throughput, hits and recomputation count the
    others; ``requests_per_engine`` counts every request). ``scrape_phase`` (0 to 1,
    exclusive): a scraping picker's scrapes after the first come that share of an interval
    earlier. ``slo_ttft_s``: the TTFT objective of the result's goodput."""
    engines = [SimEngine(i, profile, scheduling_policy=scheduling_policy,
                         kv_allocation=kv_allocation) for i in range(pods)]
    capacity = profile.kv_blocks * profile.block_size
    for r in requests:
        if r.prompt_tokens + r.max_tokens > capacity:
            raise ValueError(f"request {r.id} needs {r.prompt_tokens + r.max_tokens} tokens "
                             f"of KV cache; one engine holds {capacity}")
    heap: list[tuple[float, int, str, Any]] = [
        (r.arrival_s, i, "arrive", r) for i, r in enumerate(requests)]
    heapq.heapify(heap)
    order = itertools.count(len(heap))
    plans: dict[int, StepPlan] = {}
    touched: set[int] = set()  # engines that stepped since the last decision (may have events)
    now = 0.0
    scrape_every = float(getattr(picker, "scrape_interval_s", 0.0) or 0.0)
    scrape = getattr(picker, "scrape", None) if scrape_every > 0 else None
    if not 0.0 <= scrape_phase < 1.0:
        raise ValueError("scrape_phase must be in [0, 1)")
    if scrape is not None and heap:
        now = heap[0][0]
        scrape(engines, now)
        # scrape_phase: the next scrapes come that share of an interval earlier, as a real
        # router's scrape loop runs at no fixed phase to the arrivals (an ensemble member)
        heapq.heappush(heap, (now + scrape_every * (1.0 - scrape_phase), next(order), "scrape",
                              None))

    def kick(engine: SimEngine) -> None:
        if engine.index in plans:
            return
        plan = engine.plan_step(now)
        touched.add(engine.index)
        if plan is not None:
            plans[engine.index] = plan
            heapq.heappush(heap, (now + engine.step_duration(plan), next(order), "step",
                                  engine))

    counted = measured_ids(requests, warmup)
    placed = dict.fromkeys(PLACEMENT_CLASSES, 0)
    hold = getattr(picker, "hold", None)
    release = getattr(picker, "release", None)

    def observe() -> None:
        if touched:  # only engines that stepped can have published events
            for index in sorted(touched):
                events = engines[index].drain_events()
                if events:
                    picker.observe(index, events)
            touched.clear()

    def send(request: SimRequest, choice: int) -> None:
        if request.id in counted:  # hashes are set by now (a KV-event picker's at pick)
            placed[placement_class(engines, choice, request.hashes)] += 1
        engines[choice].enqueue(request)
        kick(engines[choice])

    pop = heapq.heappop
    while heap:
        now, _, kind, item = pop(heap)
        if now > max_simulated_s:
            break
        if kind == "step":
            engine = item
            finished = engine.finish_step(plans.pop(engine.index), now)
            kick(engine)
            if not finished:
                continue  # only arrivals, completions and scrapes release queued requests
        elif kind == "arrive":
            request: SimRequest = item
            observe()
            if hold is None or not hold(request, engines):
                send(request, picker.pick(request, engines))
        else:  # a metrics scrape; the next one only while anything else is pending
            assert scrape is not None
            scrape(engines, now)
            if heap:
                heapq.heappush(heap, (now + scrape_every, next(order), "scrape", None))
        if release is not None:  # the router's admission queue, as engines leave saturation
            observe()
            for released in release(engines, now):
                send(*released)
                observe()
    measured = [r for r in requests if r.id in counted]
    done = [r for r in measured if r.done_s is not None]
    ttft = [r.ttft_s for r in done if r.ttft_s is not None]
    e2e = [r.e2e_s for r in done if r.e2e_s is not None]
    # The engines' prefix-cache counters, for the counted requests only (each request is
    # admitted once here, adding its prompt and cached tokens to its engine's counters).
    admitted = [r for r in measured if r.admitted_s is not None]
    queries = sum(r.prompt_tokens for r in admitted)
    hits = sum(r.cached_tokens for r in admitted)
    span = (max((r.done_s for r in done if r.done_s is not None), default=0.0)
            - min((r.arrival_s for r in measured), default=0.0))

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else math.nan

    met = sum(1 for t in ttft if t <= slo_ttft_s)

    return SimResult(
        requests=len(measured), unfinished=len(measured) - len(done),
        ttft_p50_s=pct(ttft, 50), ttft_p90_s=pct(ttft, 90), ttft_p99_s=pct(ttft, 99),
        e2e_p50_s=pct(e2e, 50), e2e_p99_s=pct(e2e, 99),
        output_tokens_per_s=sum(r.max_tokens for r in done) / span if span > 0 else math.nan,
        prefix_hit_rate=hits / queries if queries else 0.0,
        requests_per_engine=[e.finished for e in engines], simulated_s=now,
        goodput_per_s=met / span if span > 0 else math.nan,
        slo_attainment=met / len(measured) if measured else math.nan,
        recomputed=recompute_breakdown(requests, profile.block_size, counted),
        placement={name: round(n / total, 4) if (total := sum(placed.values())) else 0.0
                   for name, n in placed.items()},
        preempted=sum(1 for r in measured if r.preemptions))


TTFT_CLASSES = ("first", "follower", "later")
"""Where a request stands in its trace group (a tenant, a document), for
:func:`ttft_by_class`:

* ``first``: the group's first request — it computes the shared context;
* ``follower``: arrived before the group's first request had its first token (the context
  was still being computed, or still queued, somewhere);
* ``later``: arrived after that."""


def ttft_by_class(requests: Sequence[SimRequest], groups: Sequence[str],
                  warmup: int = 0) -> dict[str, Any]:
    """TTFT by :data:`TTFT_CLASSES` (``groups[i]``: the trace group of ``requests[i]``; a
    group's first request is its earliest arrival, in any input order): per class the
    request count, TTFT p50 / p90 in seconds, the median time from arrival to admission by
    the engine (``queue_p50_s``), and ``tail_share``, the class's share of the requests
    slower than the run's TTFT p90 (an unanswered request counts as slower) — what the tail
    is made of. Classes are found over every request; only those from the ``warmup``-th
    arrival on are counted."""
    if len(requests) != len(groups):
        raise ValueError(f"{len(requests)} requests but {len(groups)} groups")
    first_token: dict[str, float] = {}
    classes = [""] * len(requests)
    for i in sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i)):
        request, group = requests[i], groups[i]
        if group not in first_token:
            first_token[group] = (request.first_token_s if request.first_token_s is not None
                                  else math.inf)
            classes[i] = "first"
        else:
            classes[i] = "follower" if request.arrival_s < first_token[group] else "later"
    counted = measured_ids(requests, warmup)
    ttft = [math.inf if r.ttft_s is None else r.ttft_s for r in requests]
    finite = [t for t, r in zip(ttft, requests, strict=True)
              if math.isfinite(t) and r.id in counted]
    p90 = float(np.percentile(finite, 90)) if finite else math.inf
    tail = sum(1 for t, r in zip(ttft, requests, strict=True) if t > p90 and r.id in counted) or 1
    out: dict[str, Any] = {}
    for name in TTFT_CLASSES:
        members = [i for i, c in enumerate(classes) if c == name and requests[i].id in counted]
        times = [ttft[i] for i in members if math.isfinite(ttft[i])]
        queued = [r.admitted_s - r.arrival_s for r in (requests[i] for i in members)
                  if r.admitted_s is not None]
        out[name] = {
            "requests": len(members),
            "ttft_p50_s": round(float(np.percentile(times, 50)), 4) if times else None,
            "ttft_p90_s": round(float(np.percentile(times, 90)), 4) if times else None,
            "queue_p50_s": round(float(np.percentile(queued, 50)), 4) if queued else None,
            "tail_share": round(sum(1 for i in members if ttft[i] > p90) / tail, 3)}
    return out


RECOMPUTE_CAUSES = ("evicted", "elsewhere", "in_flight")
"""Why a block the oracle would have hit was computed again:

* ``evicted``: this engine had computed it before and evicted it since;
* ``elsewhere``: only other engines had ever computed it (the request left the block's
  holder: a spill, or a holder that was never learnt — or every copy had been evicted since
  and the context was placed anew; :data:`PLACEMENT_CLASSES` tells these apart);
* ``in_flight``: this engine (or another one) was still computing it for an earlier request
  when this one was admitted — the same prompt sent twice before the first prefill ended.
  (Approximate: a block counts as available from the first token of the request that
  computed it, while the engine shares it from the step that schedules it; so a copy that
  hit a block still being computed is not here, and one counted here may have hit part of
  the prefix.)"""


def recompute_breakdown(requests: Sequence[SimRequest], block_size: int,
                        counted: set[int] | None = None) -> dict[str, float]:
    """Shares of all admitted prompt tokens recomputed by cause (:data:`RECOMPUTE_CAUSES`),
    replayed from the finished run in admission order: a block counts as available on an
    engine from the first token of the request that computed it there (its prefill's end).
    With ``counted``, only those requests' tokens are counted (every request is replayed).
    Only full prompt blocks are classified; the last token vLLM always computes, and partial
    blocks, are in neither the oracle's hits nor here."""
    admitted = sorted((r for r in requests if r.admitted_s is not None),
                      key=lambda r: (r.admitted_s, r.id))
    ready: dict[int, dict[int, float]] = {}  # block -> {engine: when computed there}
    counts = dict.fromkeys(RECOMPUTE_CAUSES, 0)
    prompt_tokens = 0
    for r in admitted:
        assert r.admitted_s is not None
        counts_here = counted is None or r.id in counted
        prompt_tokens += r.prompt_tokens if counts_here else 0
        done = r.first_token_s if r.first_token_s is not None else math.inf
        full = r.prompt_tokens // block_size
        for block in r.hashes[r.cached_tokens // block_size:full]:
            holders = ready.setdefault(block, {})
            if holders and counts_here:
                if r.engine in holders and holders[r.engine] <= r.admitted_s:
                    counts["evicted"] += block_size
                elif min(holders.values()) > r.admitted_s:
                    counts["in_flight"] += block_size
                else:
                    counts["elsewhere"] += block_size
            holders[r.engine] = min(holders.get(r.engine, math.inf), done)
    return {cause: round(n / prompt_tokens, 4) if prompt_tokens else 0.0
            for cause, n in counts.items()}
