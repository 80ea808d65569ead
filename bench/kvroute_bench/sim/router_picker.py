"""A simulator picker that runs kvroute's own scheduler: filters, weighted scorers, picker.

It builds a ``SchedulerProfile`` from a RoutePolicy's ``scoring`` with the router's plugin
registry (``register_builtin_plugins``, plus ``prefix-precise`` from ``kvroute_router.kvevents``)
exactly as the director does, shows it one ``Endpoint`` per simulated engine, and reports each
dispatch back to the profile (so ``prefix-approx`` learns its history as in production).

**Metrics.** With ``scrape_interval_s`` = 0 every decision sees every engine's state of that
instant (the router's best case). With ``scrape_interval_s`` > 0 (the router scrapes every
100 ms) the fleet loop calls :meth:`RouterPicker.scrape` every ``scrape_interval_s`` of
simulated time and the endpoints' metrics are that snapshot; between scrapes the router's own
counts move as in the director: a dispatch adds one to ``in_flight`` and
``dispatched_since_scrape``, a finished request takes one off both (``end_attempt``), a scrape
resets ``dispatched_since_scrape``. The prefill backlog (what ``prefill-cost`` reads) moves as in
the director in both modes: a dispatch adds the prompt tokens the engine did not hold by the
decision's prefix match, the request's first token (or end) takes them off. All engines are
scraped at the same instants (the real scrapers run one loop per endpoint with independent
phases; the age of a snapshot at a decision is uniform over [0, interval) either way).

**Engine priority** (``engine_priority=True``, the engines run ``--scheduling-policy
priority``): each request gets the ``priority`` the router would write into its body, from
the decision's prefix match on the chosen engine and the simulated arrival time, ranked after
any request still computing the pending blocks it reuses (``Endpoint.prefill_in_flight``, kept
as the director keeps it).

**KV events** (``precise=True``). Engines hash their prompt blocks with the router's own
vLLM-compatible :class:`~kvroute_router.kvevents.hashing.BlockHasher` (sha256_cbor, the engine's
block size; tokens are the prompt's bytes, as for the byte-level test model), computed once per
request by the ``prefix-precise`` scorer at its decision and handed to the engine with the
request. Their ``BlockStored`` / ``BlockRemoved`` events go into the router's
:class:`~kvroute_router.kvevents.index.PrefixIndex` of the pool's ``PoolKVEvents`` (what the ZMQ
subscriber does after decoding; the simulated feed is lossless and in order, so every endpoint
is trustworthy), whose pending marks expire on the simulated clock.

**Admission queue** (``admission_queue=True``, the default): the router's admission control,
with the policy's ``spec.admission`` thresholds and the router's own
:class:`~kvroute_router.admission.controller.AdmissionController` deciding. While every engine is
saturated on the router's view, arrivals wait in the router, first come first served (newest
first once the oldest has waited the policy's ``newestFirstAfterMs``, those requests then
newest-first at the engines too); at each arrival, completion and scrape (the router's release
points; its refresh pump runs at the scrape period) as many are let go as
``AdmissionController.room`` finds places for, each routed at that moment. Replicas
(``ReplicatedPicker``) each hold their own queue.

Only the engines whose state changed since the last look are re-read, so a decision costs the
scheduler's own work, not a scan of the fleet.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any, NamedTuple

from kvroute_api.inference_pool import InferencePool
from kvroute_api.route_policy import AdmissionSpec, ScoringSpec
from kvroute_emulator.model.engine import SimEngine, SimRequest
from kvroute_router.admission.controller import AdmissionController, EndpointLoad, WaitingKey
from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import Endpoint, EndpointMetrics, PrefillInFlight
from kvroute_router.framework.profile import SchedulerProfile, build_profile
from kvroute_router.framework.registry import (
    REPLICA_COUNT,
    PluginContext,
    PluginRegistry,
    ReplicaCount,
    SharedServices,
)
from kvroute_router.framework.request import LLMRequest
from kvroute_router.plugins.builtin import register_builtin_plugins
from kvroute_router.plugins.max_score import MaxScorePicker
from kvroute_router.plugins.prefix_precise import STATE_MATCH
from kvroute_router.replicasync.wire import MAX_WAITERS

POOL_KEY = "sim/pool"


class ByteTokenizer:
    """The byte-level test model's tokenizer: one token per UTF-8 byte of the prompt text
    (duck-typed ``PromptTokenizer.tokenize`` for ``PoolKVEvents``)."""

    def tokenize(self, kind: str, body: Any, *, prompt_text: str = "") -> list[int]:
        return list(prompt_text.encode())


def _priority_pool(block_size: int) -> InferencePool:
    """The simulated pool as the plugins read it when its engines rank by priority (what
    ``prefill-cost`` reads from it, the pool's ``engine.schedulingPolicy``)."""
    return InferencePool.model_validate({
        "apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": POOL_KEY.rpartition("/")[2]},
        "spec": {"mode": "External", "model": {"name": "sim-model"}, "resources": {"gpus": 0},
                 "engine": {"blockSize": block_size, "schedulingPolicy": "Priority"},
                 "endpoints": [{"name": "pod-0", "address": "10.0.0.0:8000"}]},
    }, by_alias=True)


class RouterPicker:
    """Routes simulated requests with the router's scheduler profile for ``scoring`` (and the
    saturation thresholds of ``admission``, a RoutePolicy's ``spec.admission``; with
    ``eviction_forecast``, the pool's ``engine.kvEvents.evictionForecast``)."""

    def __init__(self, scoring: dict[str, Any] | ScoringSpec, model: str = "sim-model",
                 block_size: int = 32, scrape_interval_s: float = 0.0,
                 precise: bool = False, admission: dict[str, Any] | None = None,
                 engine_priority: bool = False, seed: int = 0,
                 eviction_forecast: bool = True, admission_queue: bool = True) -> None:
        spec = scoring if isinstance(scoring, ScoringSpec) else ScoringSpec.model_validate(
            scoring)
        registry = register_builtin_plugins(PluginRegistry())
        services = SharedServices()
        self.services = services
        """The plugins' shared services (a replicated picker with replica sync adds the
        replica count)."""
        self.now = 0.0  # simulated time of the latest decision or scrape
        self.pool_events: Any = None
        self._state_hashes = ""
        if precise:
            self._wire_kv_events(registry, services, block_size, eviction_forecast)
        context = PluginContext(scoring=spec, pool_key=POOL_KEY,
                                pool=_priority_pool(block_size) if engine_priority else None,
                                services=services, policy_key="sim/policy",
                                admission=(AdmissionSpec.model_validate(admission)
                                           if admission is not None else None))
        self.profile: SchedulerProfile = build_profile(registry, context, "sim")
        self.admission: AdmissionController | None = (
            AdmissionController("sim/policy", context.admission or AdmissionSpec(), self._load)
            if admission_queue else None)
        """The router's admission control: while every engine is saturated (by the policy's
        ``spec.admission`` thresholds, on the router's view of the engines' queues), arrivals
        wait in the router's queue, first come first served, and are routed as engines drop
        below saturation (:meth:`hold`, :meth:`release`)."""
        self.held: deque[SimRequest] = deque()
        self._newest_first: set[int] = set()
        """Requests the queue let go newest-first (``newestFirstAfterMs``): the engines serve
        them newest-first too (``LLMRequest.newest_first``)."""
        if isinstance(self.profile.picker, MaxScorePicker):
            # the tie-break draws from a seeded stream: one run's numbers reproduce
            self.profile.picker.rng = random.Random(seed)
        self.priority_ms_per_token = spec.prefill_priority_ms_per_token
        self.engine_priority = engine_priority
        """The engines run priority scheduling: each request gets the vLLM ``priority`` the
        router sets (``LLMRequest.engine_priority``, arrival in simulated ms)."""
        self.model = model
        self.block_size = block_size
        self.scrape_interval_s = scrape_interval_s
        self.precise = precise
        self._endpoints: list[Endpoint] = []
        self._position: dict[int, int] = {}  # id(endpoint) -> engine index
        self._seen: list[int] = []  # engine.version at the last look (-1: never)
        self._scraped: list[int] = []  # engine.version at the last scrape (-1: never)
        self._finished: list[int] = []  # engine.finished at the last look
        self._unanswered: list[list[tuple[SimRequest, float,
                                          tuple[int, PrefillInFlight] | None]]] = []
        """Per engine: requests dispatched there with no first token yet, what each added
        to the endpoint's ``prefill_backlog`` and what it registered in its
        ``prefill_in_flight`` (``Director.dispatch``/``answering``)."""

    def _wire_kv_events(self, registry: PluginRegistry, services: SharedServices,
                        block_size: int, eviction_forecast: bool) -> None:
        from kvroute_router.kvevents.feed import build_precise_prefix, services_key
        from kvroute_router.kvevents.hashing import BlockHashConfig
        from kvroute_router.kvevents.hub import PoolKVEvents
        from kvroute_router.kvevents.index import PrefixIndex
        from kvroute_router.plugins.prefix_precise import STATE_HASHES, PrecisePrefixScorer

        class SimPoolKVEvents(PoolKVEvents):
            """The pool's KV-event state, fed by the simulated engines (no ZMQ)."""

            def trustworthy(self, endpoint: str) -> bool:
                return True

        registry.register(PrecisePrefixScorer.TYPE, "scorer", build_precise_prefix,
                          prefix_match=True)
        events = SimPoolKVEvents(BlockHashConfig(block_size=block_size),
                                 tokenizer=ByteTokenizer())  # type: ignore[arg-type]
        events.index = PrefixIndex(events.index.max_blocks_per_endpoint,
                                   pending_ttl=events.index.pending_ttl, clock=self._clock,
                                   forecast_evictions=eviction_forecast)
        services.put(services_key(POOL_KEY), events)
        self.pool_events = events
        self._state_hashes = STATE_HASHES

    def _clock(self) -> float:
        return self.now

    # --- what the fleet loop calls -----------------------------------------------------------

    def observe(self, engine: int, events: list[dict[str, Any]]) -> None:
        """KV events of ``engine`` since the last call, into the router's prefix index."""
        if self.pool_events is None:
            return
        index = self.pool_events.index
        name = f"pod-{engine}"
        for event in events:
            if event["type"] == "BlockStored":
                index.store(name, event["block_hashes"])
            elif event["type"] == "BlockRemoved":
                index.remove(name, event["block_hashes"])

    def scrape(self, engines: Sequence[SimEngine], now: float) -> None:
        """A metrics scrape of every engine at simulated time ``now`` (stale mode only)."""
        self.now = now
        self._grow(engines)
        for i, engine in enumerate(engines):
            endpoint = self._endpoints[i]
            if self._seen[i] != engine.version:
                self._refresh_counts(i, endpoint, engine)
            if self._scraped[i] != engine.version:
                endpoint.metrics = self._snapshot(engine)
                self._scraped[i] = engine.version
            endpoint.unseen.clear()

    def _load(self) -> Iterator[EndpointLoad]:
        """The admission hook's ``_load``: each endpoint's queue estimate and KV usage."""
        for endpoint in self._endpoints:
            yield EndpointLoad(waiting=int(endpoint.waiting_estimate()),
                               kv_utilization=endpoint.kv_usage_estimate())

    def hold(self, request: SimRequest, engines: Sequence[SimEngine]) -> bool:
        """Admission control at ``request``'s arrival: True when it joins the router's queue
        (others are waiting already, or every engine is saturated)."""
        if self.admission is None:
            return False
        self.now = request.arrival_s
        self._sync(engines)
        if self.held or self.admission.saturated():
            self.held.append(request)
            return True
        return False

    def release(self, engines: Sequence[SimEngine],
                now: float) -> Iterator[tuple[SimRequest, int]]:
        """The queued requests the router lets go at ``now``, first come first served, each
        with its engine (chosen when the caller has sent the one before): as many as the
        engines have room for below saturation when it is called, a replica its share of it
        (``release_waiting``, ``release_room``)."""
        if not self.held or self.admission is None:
            return
        self.now = now
        self._sync(engines)
        after = self.admission.spec.newest_first_after_ms
        newest_first = after is not None and (now - self.held[0].arrival_s) * 1000 >= after
        for _ in range(self.admission.release_count(len(self.held), self.waiting_keys,
                                                    now_ms=now * 1000,
                                                    newest_first=newest_first)):
            if newest_first:
                request = self.held.pop()
                self._newest_first.add(request.id)
            else:
                request = self.held.popleft()
            yield request, self.pick(request, engines, now)

    def waiting_keys(self, limit: int) -> list[WaitingKey]:
        """The first ``limit`` queued requests' order keys (one priority class; arrival ms),
        as the router's ``AdmissionController.waiting_keys``."""
        return [(0, round(request.arrival_s * 1000)) for request in islice(self.held, limit)]

    def pick(self, request: SimRequest, engines: Sequence[SimEngine],
             now: float | None = None) -> int:
        self.now = request.arrival_s if now is None else now
        endpoints = self._sync(engines)
        llm = LLMRequest(model=self.model, prompt_text=request.prompt,
                         max_tokens=request.max_tokens)
        llm.newest_first = request.id in self._newest_first
        state = CycleState()
        ranked = self.profile.run(state, llm, endpoints, 1)
        if not ranked:
            raise RuntimeError("the router's filters left no endpoint for a simulated request")
        chosen = ranked[0].endpoint
        self.profile.dispatched(state, llm, chosen)
        index = self._position[id(chosen)]
        held = self.profile.prefix_match(ranked[0])
        amount = llm.prefill_tokens(held)
        chosen.add_prefill_backlog(amount, self._newest_first_at_engines(request))
        started: tuple[int, PrefillInFlight] | None = None
        if self.scrape_interval_s > 0:  # director.dispatch: counted before the next scrape
            chosen.in_flight += 1
            chosen.dispatched()
            self._seen[index] = -1  # re-read the engine's counts at the next look
        if self.precise:
            hashes = state.read(self._state_hashes, list)
            if hashes is None:  # the profile did not run prefix-precise: hash here
                hashes = self.pool_events.hasher.block_hashes(list(request.prompt.encode()))
            request.hashes = hashes
        if self.engine_priority:
            started = self._set_priority(request, llm, state, chosen, amount)
        self._unanswered[index].append((request, amount, started))
        return index

    def _set_priority(self, request: SimRequest, llm: LLMRequest, state: CycleState,
                      chosen: Endpoint, amount: float) -> tuple[int, PrefillInFlight] | None:
        """``Decision.engine_priority``: arrival ms plus the penalty per uncached token (exact
        from the precise match), ranked after any attempt computing the pending blocks; then
        ``Director._start_prefill``: register the prefix this request computes. Returns what
        was registered, for ``_answered``."""
        matched = state.read(STATE_MATCH, dict) if self.precise else None
        held = None if matched is None else int(matched.get(chosen.name, 0))
        uncached = amount if held is None else float(
            max(0, len(request.hashes) - held) * self.block_size)
        llm.received_unix_ms = round(request.arrival_s * 1000)
        priority = llm.engine_priority(uncached, self.priority_ms_per_token)
        if held is not None:
            floor = chosen.prefill_priority_floor(request.hashes[:held])
            if floor is not None:
                priority = max(priority, floor + 1)
        request.priority = priority
        if (held is None or held >= len(request.hashes)
                or request.hashes[held] in chosen.prefill_in_flight):
            return None
        flight = PrefillInFlight(priority)
        chosen.prefill_in_flight[request.hashes[held]] = flight
        return request.hashes[held], flight

    def _newest_first_at_engines(self, request: SimRequest) -> bool:
        """``Decision.newest_first_at_engines``: let go newest-first by this picker's queue,
        to engines that rank by priority."""
        return self.engine_priority and request.id in self._newest_first

    def share_prefill(self, index: int, request: SimRequest,
                      started: tuple[int, PrefillInFlight]) -> None:
        """Another replica's ``request`` computes a prefix on engine ``index`` from block
        ``started[0]``: registered here too, until its first token (``_answered``)."""
        first, flight = started
        endpoint = self._endpoints[index]
        if first not in endpoint.prefill_in_flight:
            endpoint.prefill_in_flight[first] = flight
            self._unanswered[index].append((request, 0.0, started))

    def share_backlog(self, index: int, request: SimRequest, amount: float) -> None:
        """Another replica's ``request`` adds ``amount`` prompt tokens to engine ``index``'s
        prefill backlog here too, until its first token (``_answered``)."""
        if amount:
            self._endpoints[index].add_prefill_backlog(amount)
            self._unanswered[index].append((request, amount, None))

    # --- endpoints ---------------------------------------------------------------------------

    def _grow(self, engines: Sequence[SimEngine]) -> None:
        while len(self._endpoints) < len(engines):
            i = len(self._endpoints)
            endpoint = Endpoint(name=f"pod-{i}", address=f"10.0.0.{i}:8000", pool=POOL_KEY)
            self._endpoints.append(endpoint)
            self._position[id(endpoint)] = i
            self._seen.append(-1)
            self._scraped.append(-1)
            self._finished.append(0)
            self._unanswered.append([])

    def _snapshot(self, engine: SimEngine) -> EndpointMetrics:
        # scraped_at = +inf: the plugins judge staleness on the wall clock (time.monotonic),
        # and in simulated time a snapshot is at most one scrape interval (100 ms) old, well
        # inside the router's 1 s staleness limit: it always counts as fresh, deterministically.
        return EndpointMetrics(
            running=float(len(engine.running)), waiting=float(len(engine.waiting)),
            kv_cache_usage=engine._used_blocks() / engine.profile.kv_blocks,
            prefix_cache_queries=float(engine.prefix_queries),
            prefix_cache_hits=float(engine.prefix_hits),
            block_size=self.block_size, num_gpu_blocks=engine.profile.kv_blocks,
            scraped_at=math.inf)

    def _answered(self, i: int, endpoint: Endpoint) -> None:
        """Requests of engine ``i`` that produced their first token leave its backlog."""
        pending = self._unanswered[i]
        still = [entry for entry in pending
                 if entry[0].first_token_s is None and entry[0].done_s is None]
        if len(still) < len(pending):
            for request, amount, started in pending:  # Director.answering
                if request.first_token_s is None and request.done_s is None:
                    continue
                if amount:
                    endpoint.remove_prefill_backlog(amount,
                                                    self._newest_first_at_engines(request))
                if started is not None:  # the prefix is computed
                    first, flight = started
                    if endpoint.prefill_in_flight.get(first) is flight:
                        del endpoint.prefill_in_flight[first]
            self._unanswered[i] = still

    def _refresh_counts(self, i: int, endpoint: Endpoint, engine: SimEngine) -> None:
        """The router's own counts: in flight (it sees every completion), and finished
        requests taken off ``dispatched_since_scrape`` as ``Director.end_attempt`` does."""
        self._answered(i, endpoint)
        endpoint.in_flight = len(engine.running) + len(engine.waiting)
        done = engine.finished - self._finished[i]
        if done:
            endpoint.forget_unseen(done)  # without identities: the oldest
            self._finished[i] = engine.finished
        self._seen[i] = engine.version

    def _sync(self, engines: Sequence[SimEngine]) -> list[Endpoint]:
        self._grow(engines)
        seen = self._seen
        stale_mode = self.scrape_interval_s > 0
        for i, engine in enumerate(engines):
            if seen[i] == engine.version:
                continue
            endpoint = self._endpoints[i]
            if stale_mode:  # metrics wait for the next scrape; the router's counts do not
                self._refresh_counts(i, endpoint, engine)
                continue
            endpoint.metrics = self._snapshot(engine)
            endpoint.in_flight = len(engine.running) + len(engine.waiting)
            endpoint.unseen.clear()
            self._answered(i, endpoint)
            seen[i] = engine.version
        return self._endpoints[: len(engines)]


SHARED_STATE = ("", "pending", "counts", "both", "all")


class _Shared(NamedTuple):
    """One dispatch on its way to the other replicas (``ReplicatedPicker.delay_s``)."""

    due_s: float
    chooser: RouterPicker
    engine: int
    request: SimRequest
    amount: float
    started: tuple[int, PrefillInFlight] | None


class ReplicatedPicker:
    """``replicas`` independent routers (``RouterPicker``s of one scoring) behind a per-request
    round-robin balancer, as ``kvroute bench --replicas N`` runs them on a real fleet: every
    replica sees every engine's KV events and takes its own metrics scrapes (all at the same
    instants here), but knows only its own dispatches — its pending-block marks and its
    ``dispatched_since_scrape`` counts — until the engines' events and the next scrape show
    the others'. ``make(i)`` builds replica ``i``; each draws its tie-breaks from its own
    seeded stream, as router processes do (replicas drawing one stream pick the same engine
    among equals at their k-th decisions).

    ``shared`` is what replica coordination shares, each dispatch made known to every replica
    at once (replica sync): ``"pending"`` marks the request's blocks pending on the chosen
    engine in every replica's index (a shared pending-block store; with the eviction forecast,
    touching the blocks held there and forecasting the evictions, as replica sync's *held*
    blocks make every replica do) and registers the prefix it
    computes in every replica's ``prefill_in_flight`` until its first token (replica sync's
    computes and answered records), ``"counts"`` counts the dispatch in every replica's queue
    estimate, ``"both"`` does both (replica sync in round 18), ``"all"`` adds the prompt tokens
    it leaves the engine to compute to every replica's ``prefill_backlog`` until its first
    token (replica sync's backlog records, round 19); ``""`` shares nothing.
    A simplification either way: each replica's ``in_flight`` is the engine's whole count
    (the simulator's ``RouterPicker`` reads it from the engine), so only the between-scrape
    queue estimate and the pending marks differ between replicas; and each replica takes
    every completion off its between-scrape count, where a real replica sees only its own
    until its next scrape (sharing the ends over replica sync was measured in round 36 of
    docs/benchmarks/emulated-fleet.md and not kept).

    ``delay_s`` None (the default) is the idealised set-up above: every dispatch shared at
    once, every replica scraping at the same instants and releasing its queue at every
    arrival, completion and scrape of the fleet. A number makes the replicas run as router
    processes do (round 37 of docs/benchmarks/emulated-fleet.md): a shared dispatch reaches the
    others ``delay_s`` later (replica sync's Redis round trip, in simulated time — on the
    emulated fleet the real latency times the time scale), applied at their first arrival,
    release or scrape at or after it is due, as the receiver applies it between the router's
    own decisions; each replica scrapes every ``scrape_interval_s`` at its own phase
    (``1/replicas`` of the period apart); and each releases its queue only at its own release
    points — an arrival the balancer hands it, the end of a request it dispatched, its own
    scrape.

    With the admission queue (the replicas' default), each replica queues the arrivals the
    balancer hands it while it finds every engine saturated, and lets them go as it finds
    room, as three router processes each with its own ``AdmissionController`` do: nothing of
    a queue is shared, only (``shared``) the dispatches it releases; with ``shared`` (replica
    sync, which counts the replicas and carries their waiting reports) each lets go its own
    waiters among the first ``1/replicas`` of the room's worth of all the replicas' queues merged
    by arrival, each replica's report read by the others ``delay_s`` after its queue changed.
    """

    def __init__(self, make: Callable[[int], RouterPicker], replicas: int,
                 shared: str = "", delay_s: float | None = None) -> None:
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        if shared not in SHARED_STATE:
            raise ValueError(f"shared must be one of {SHARED_STATE}")
        if delay_s is not None and delay_s < 0:
            raise ValueError("delay_s must be >= 0")
        self.replicas = [make(index) for index in range(replicas)]
        self._now = 0.0
        self._reports: list[deque[tuple[float, list[WaitingKey]]]] = [
            deque([(-math.inf, [])]) for _ in self.replicas]
        """Each replica's waiting reports (when, its first waiters' keys), oldest first."""
        if shared:  # replica sync counts the replicas and reports their queues: each releases
            # its share of the room, its own among the fleet's oldest waiters
            for k, replica in enumerate(self.replicas):
                replica.services.put(REPLICA_COUNT, ReplicaCount(lambda: replicas))
                if replica.admission is not None:
                    replica.admission.replicas = lambda: replicas
                    replica.admission.peers_waiting = (
                        lambda k=k: self._peers_waiting(k))
        self.scrape_interval_s = self.replicas[0].scrape_interval_s
        self.shared = shared
        self._next = 0
        self._arriving: RouterPicker | None = None
        self._release_turn = 0
        self.delay_s = delay_s or 0.0
        self.as_processes = delay_s is not None
        self._in_transit: deque[_Shared] = deque()  # in order of dispatch, so of arrival
        if self.as_processes:  # one replica scrapes per tick, each at its own phase
            self.scrape_interval_s /= replicas
        self._scrapes = 0
        self._due: set[int] = set()  # replicas at a release point since the last release
        # Run as processes: each replica's dispatches not ended yet (an end is its release
        # point).
        self._sent: list[list[SimRequest]] = [[] for _ in self.replicas]

    def observe(self, engine: int, events: list[dict[str, Any]]) -> None:
        for replica in self.replicas:
            replica.observe(engine, events)

    def scrape(self, engines: Sequence[SimEngine], now: float) -> None:
        self._deliver(engines, now)
        if self.as_processes:
            turn = self._scrapes % len(self.replicas)
            self._scrapes += 1
            self.replicas[turn].scrape(engines, now)
            self._due.add(turn)
            return
        for replica in self.replicas:
            replica.scrape(engines, now)

    def _chooser(self) -> RouterPicker:
        """The replica the balancer hands the next arrival to (round-robin); the one
        :meth:`hold` chose when it did not keep the request."""
        chooser, self._arriving = self._arriving, None
        if chooser is None:
            chooser = self.replicas[self._next % len(self.replicas)]
            self._next += 1
        return chooser

    def hold(self, request: SimRequest, engines: Sequence[SimEngine]) -> bool:
        """Admission control at ``request``'s arrival, by the replica the balancer hands it
        to: each replica queues its own arrivals (its own ``AdmissionController``), judging
        saturation on its own view of the engines' queues."""
        self._deliver(engines, request.arrival_s)
        chooser = self._chooser()
        self._due.add(self.replicas.index(chooser))
        if chooser.hold(request, engines):
            self._report(self.replicas.index(chooser), request.arrival_s)
            return True
        self._arriving = chooser  # the pick that follows is this replica's
        return False

    def release(self, engines: Sequence[SimEngine],
                now: float) -> Iterator[tuple[SimRequest, int]]:
        """Every replica's queued requests it lets go at ``now``, replica by replica, each
        dispatch shared (``shared``) before the next replica judges the room left. The
        replica that goes first takes turns (a real replica releases on its own arrivals,
        completions and scrapes; none of them is always first to see the room). Run as
        processes (``delay_s`` set), only the replicas at a release point of their own."""
        self._deliver(engines, now)
        if self.as_processes:
            for turn, sent in enumerate(self._sent):
                unfinished = [request for request in sent if request.done_s is None]
                if len(unfinished) < len(sent):  # a request it dispatched ended
                    self._due.add(turn)
                    self._sent[turn] = unfinished
        due, self._due = self._due, set()
        count = len(self.replicas)
        first, self._release_turn = self._release_turn, (self._release_turn + 1) % count
        for turn in range(count):
            k = (first + turn) % count
            if self.as_processes and k not in due:
                continue
            replica = self.replicas[k]
            self._now = now
            released = False
            for request, index in replica.release(engines, now):
                released = True
                self._share(replica, index, request, engines, now)
                if self.as_processes:
                    self._sent[k].append(request)
                yield request, index
            if released:
                self._report(k, now)

    def _report(self, k: int, now: float) -> None:
        """Replica ``k``'s queue changed at ``now``: its waiting report (replica sync sends
        one per change), which the others read ``delay_s`` later."""
        if self.shared:
            self._reports[k].append((now, self.replicas[k].waiting_keys(MAX_WAITERS)))

    def _peers_waiting(self, k: int) -> list[WaitingKey]:
        """The other replicas' waiters as replica ``k`` knows them: each one's latest report
        sent at least ``delay_s`` before now."""
        horizon = self._now - self.delay_s
        keys: list[WaitingKey] = []
        for j, reports in enumerate(self._reports):
            if j == k:
                continue
            while len(reports) > 1 and reports[1][0] <= horizon:
                reports.popleft()
            if reports[0][0] <= horizon:
                keys += reports[0][1]
        return keys

    def pick(self, request: SimRequest, engines: Sequence[SimEngine]) -> int:
        self._deliver(engines, request.arrival_s)
        chooser = self._chooser()
        index = chooser.pick(request, engines)
        if self.as_processes:
            self._sent[self.replicas.index(chooser)].append(request)
        self._share(chooser, index, request, engines, request.arrival_s)
        return index

    def _share(self, chooser: RouterPicker, index: int, request: SimRequest,
               engines: Sequence[SimEngine], now: float) -> None:
        """What replica coordination tells the other replicas of ``chooser``'s dispatch of
        ``request`` to engine ``index`` (``shared``)."""
        _, amount, started = chooser._unanswered[index][-1]  # its backlog and prefix
        if not self.shared:
            return
        shared = _Shared(now + self.delay_s, chooser, index, request, amount, started)
        if self.delay_s > 0:
            self._in_transit.append(shared)
        else:
            self._apply(shared, engines)

    def _deliver(self, engines: Sequence[SimEngine], now: float) -> None:
        """Apply the shared dispatches due by ``now`` (``delay_s``)."""
        transit = self._in_transit
        while transit and transit[0].due_s <= now:
            self._apply(transit.popleft(), engines)

    def _apply(self, shared: _Shared, engines: Sequence[SimEngine]) -> None:
        chooser, index, request = shared.chooser, shared.engine, shared.request
        amount, started, now = shared.amount, shared.started, shared.due_s
        for other in self.replicas:
            if other is chooser:
                continue
            other.now = max(other.now, now)
            other._grow(engines)
            if (self.shared in ("pending", "both", "all") and other.pool_events is not None
                    and request.hashes):
                other.pool_events.index.mark_pending(
                    f"pod-{index}", request.hashes,
                    other._endpoints[index].kv_capacity_blocks)
                if started is not None:  # ReplicaSync._prefill_started
                    other.share_prefill(index, request, started)
            if self.shared == "all":
                other.share_backlog(index, request, amount)
            if self.shared in ("counts", "both", "all") and other.scrape_interval_s > 0:
                other._endpoints[index].dispatched()
