"""The director: one request path shared by the proxy, Envoy ext_proc and gRPC Pick.

``route(request)`` → :class:`Decision` runs, in order:

1. **resolve** the model name to a RoutePolicy (or the policy implied by a pool serving that
   model name) — 404 if none;
2. **limits** of ``spec.admission`` that need no state (max output tokens → 400, max prompt
   tokens → 413);
3. **admission hooks** (:class:`AdmissionHook`, registered with ``add_admission_hook``): async,
   may queue (await), shed (raise :class:`RoutingError` 429 with ``retry_after``), or narrow the
   pools (return :class:`Admission` with ``pools``) and ask to be told the outcome
   (``Admission.on_finish``). This is where budgets, admission control and batch-level routing
   plug in;
4. **pool choice**: the admitted primary pools in weighted-random order, then fallback pools;
5. **scheduling** in the first pool whose profile leaves a candidate: filters → weighted scorers
   → picker; the picker's order gives the target and fallbacks — 503 if no pool has one.

Servers call ``open(request)`` instead: it routes and dispatches the first attempt (counts the
request in flight at once and lets plugins learn, e.g. the prefix history) with no ``await`` in
between, and returns a :class:`RequestLifecycle` that dispatches further attempts, ends them and
finishes the request exactly once — also when anything raises or is cancelled (the rule is in
:mod:`kvroute_router.framework.lifecycle`). ``CompletionObserver``s hear every final outcome,
``DispatchListener``s every attempt sent (as the profile's ``DispatchObserver`` plugins do).
A plugin that raises while scheduling frees what the admission hooks held before the error
propagates.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvroute_api.route_policy import RoutePolicy
from prometheus_client import CollectorRegistry

from kvroute_router.datastore.resolution import PolicyConflictError
from kvroute_router.datastore.store import Datastore, PoolState, Resolution
from kvroute_router.framework.cycle_state import CycleState
from kvroute_router.framework.endpoint import (
    STATE_HEALTH_PANIC,
    Endpoint,
    PrefillInFlight,
    panic_possible,
)
from kvroute_router.framework.lifecycle import Admission, DecisionView, Outcome, RoutingError
from kvroute_router.framework.plugins import ScoredEndpoint
from kvroute_router.framework.profile import SchedulerProfile, build_profile
from kvroute_router.framework.registry import PluginContext, PluginRegistry, SharedServices
from kvroute_router.framework.request import LLMRequest
from kvroute_router.plugins.prefix_precise import STATE_HASHES, STATE_MATCH
from kvroute_router.router_metrics import Children, RouterMetrics

log = logging.getLogger(__name__)


class AdmissionHook(Protocol):
    """Runs before the pick; raise RoutingError(429, ...) to shed, await to queue."""

    def admit(self, request: LLMRequest, resolution: Resolution) -> Awaitable[Admission | None]:
        ...


class CompletionObserver(Protocol):
    """Told the final outcome of every routed request."""

    def on_complete(self, decision: Decision, outcome: Outcome) -> None: ...


class DispatchListener(Protocol):
    """Told every attempt the director sends (replica sync shares it with the other
    replicas)."""

    def __call__(self, decision: Decision, endpoint: Endpoint) -> None: ...


class AnsweringListener(Protocol):
    """Told when an attempt that added prompt tokens to its endpoint's prefill backlog
    (``backlog``, 0 if none) or registered a prefix it makes the endpoint compute (``first``,
    its first block, from ``Decision.prefill_started``; ``None`` if none) started answering or
    ended (replica sync tells the other replicas, which counted both from the dispatch), and
    when any attempt's first byte came (``first_byte``: the endpoint is answering, which the
    other replicas count in ``Endpoint.answers_started`` as this one does)."""

    def __call__(self, decision: Decision, endpoint: Endpoint, first: int | None,
                 backlog: float, first_byte: bool) -> None: ...


@dataclass
class Decision:
    """The result of routing one request."""

    request: LLMRequest
    policy: RoutePolicy
    policy_key: str
    pool: PoolState
    profile: SchedulerProfile
    state: CycleState
    ranked: list[ScoredEndpoint]
    decided_in_s: float
    admissions: list[Admission] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)
    finished: bool = False
    prefill_backlog: dict[str, float] = field(default_factory=dict)
    """What each attempt in flight added to its endpoint's ``prefill_backlog``, by endpoint
    name, until its answer starts or it ends."""
    dispatch_numbers: dict[str, int] = field(default_factory=dict)
    """Each attempt in flight's number on its endpoint (``Endpoint.dispatched``), by endpoint
    name, until its first byte or its end (``Endpoint.answered``)."""
    prefill_started: dict[str, tuple[int, PrefillInFlight]] = field(default_factory=dict)
    """What each attempt in flight registered in its endpoint's ``prefill_in_flight`` (the
    first block it computes, and what its waiters wait on), by endpoint name."""
    engine_priorities: dict[str, int] = field(default_factory=dict)
    """:meth:`engine_priority` by endpoint name, once computed: the value a body carries."""

    @property
    def endpoints(self) -> list[Endpoint]:
        return [s.endpoint for s in self.ranked]

    @property
    def policy_name(self) -> str:
        return self.policy.metadata.name

    @property
    def max_attempts(self) -> int:
        return self.policy.spec.retries.max_attempts

    @property
    def pool_name(self) -> str:
        return self.pool.name

    @property
    def served_model(self) -> str:
        """The model name the engine is asked for: the pool's LoRA adapter when the policy
        names one, else the pool's served model."""
        return self.request.lora_adapter or self.pool.model_name

    @property
    def request_timeout_s(self) -> float:
        return float(self.policy.spec.request_timeout_seconds)

    @property
    def per_try_timeout_s(self) -> float:
        return self.policy.spec.retries.per_try_timeout_ms / 1000.0

    @property
    def prefill_wait_s(self) -> float:
        return self.policy.spec.scoring.prefill_wait_ms / 1000.0

    @property
    def priority_engines(self) -> bool:
        """The pool's engines run vLLM's priority scheduling (``spec.engine.schedulingPolicy``)."""
        return self.pool.pool.spec.engine.ranks_by_priority

    @property
    def newest_first_at_engines(self) -> bool:
        """The admission queue let the request go newest-first and the engines rank by
        priority: it overtakes every arrival-ranked request queued there."""
        return self.request.newest_first and self.priority_engines

    def engine_priority(self, endpoint: Endpoint) -> int | None:
        """The vLLM ``priority`` to send ``endpoint`` (lower is served first), or None when
        the pool's engines run FCFS (``spec.engine.schedulingPolicy``) and the client's field,
        if any, goes through untouched (FCFS engines ignore it). Under priority scheduling the
        router owns the field — a client's own value would let it jump every queue — and sets
        the request's arrival time in ms plus ``scoring.prefillPriorityMsPerToken`` per prompt
        token ``endpoint`` does not hold by this decision's prefix match: a mostly cached
        prompt goes ahead of a long miss that arrived up to its penalty earlier, and a miss is
        never overtaken by requests younger than its penalty. Blocks the match counted as
        *pending* (another attempt of this router is computing them there) are not cached yet:
        the request is ranked after that attempt, at least one more than its priority, else it
        would compute them itself first (docs/router.md, *Engine queue order*). Computed once
        per endpoint: every caller gets the value the body carries."""
        if not self.priority_engines:
            return None
        known = self.engine_priorities.get(endpoint.name)
        if known is not None:
            return known
        priority = self.request.engine_priority(
            self.uncached_tokens(endpoint), self.policy.spec.scoring.prefill_priority_ms_per_token)
        blocks = self.prompt_blocks(endpoint)
        if blocks is not None:
            hashes, held = blocks
            floor = endpoint.prefill_priority_floor(hashes[:held])
            if floor is not None:
                priority = max(priority, floor + 1)
        self.engine_priorities[endpoint.name] = priority
        return priority

    def uncached_tokens(self, endpoint: Endpoint) -> float:
        """Prompt tokens ``endpoint`` must compute: exact from ``prefix-precise``'s blocks
        (the engine's tokens, whole blocks) when it matched, else the estimate of
        :meth:`LLMRequest.prefill_tokens` (UTF-8 bytes / 4 without token ids)."""
        blocks = self.prompt_blocks(endpoint)
        if blocks is not None:
            hashes, held = blocks
            return float(max(0, len(hashes) - held) * self.pool.pool.spec.engine.block_size)
        return self.request.prefill_tokens(self.prefix_match_ratio(endpoint))

    def prompt_blocks(self, endpoint: Endpoint) -> tuple[list[int], int] | None:
        """The prompt's block hashes and how many of them ``endpoint`` held, published or
        pending, at the decision (``prefix-precise``'s match); None when that scorer did not
        match this prompt against the index."""
        hashes = self.state.read(STATE_HASHES, list)
        matched = self.state.read(STATE_MATCH, dict)
        if not hashes or matched is None:
            return None
        return hashes, int(matched.get(endpoint.name, 0))

    def prefix_match_ratio(self, endpoint: Endpoint | None = None) -> float | None:
        target = endpoint or self.ranked[0].endpoint
        for scored in self.ranked:
            if scored.endpoint is target:
                return self.profile.prefix_match(scored)
        return None

    def reasons(self) -> list[str]:
        """Human-readable why: the policy, the pool, each candidate's scores."""
        lines = [f"policy={self.policy_key}", f"pool={self.pool.key}"]
        lines.extend(f"scorer {k} replaced by {v or 'nothing'} (not available)"
                     for k, v in self.profile.degraded.items())
        for scored in self.ranked:
            parts = " ".join(f"{k}={v:.3f}" for k, v in scored.by_scorer.items())
            lines.append(f"{scored.endpoint.name} total={scored.total:.3f} {parts}".rstrip())
        return lines


class RequestLifecycle:
    """A routed request from its first dispatch to its outcome (the
    :class:`~kvroute_router.framework.lifecycle.RoutedRequest` the servers hold)."""

    def __init__(self, director: Director, decision: Decision) -> None:
        self._director = director
        self._decision = decision
        self._endpoint: Endpoint | None = None
        self._answered = False

    @property
    def decision(self) -> Decision:
        return self._decision

    @property
    def endpoint(self) -> Endpoint | None:
        return self._endpoint

    def dispatch(self, endpoint: Endpoint) -> None:
        self.end_attempt()
        self._endpoint = endpoint  # first: a plugin raising in dispatch still gets ended
        self._answered = False
        self._director.dispatch(self._decision, endpoint)

    def answering(self) -> None:
        if self._endpoint is not None:
            first_byte, self._answered = not self._answered, True
            self._director.answering(self._decision, self._endpoint, first_byte=first_byte)

    async def wait_for_prefill(self, limit_s: float) -> float:
        if self._endpoint is None:
            return 0.0
        return await self._director.wait_for_prefill(self._decision, self._endpoint, limit_s)

    def end_attempt(self) -> None:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            self._director.end_attempt(self._decision, endpoint)

    def finish(self, endpoint: Endpoint | None, outcome: Outcome) -> None:
        self.end_attempt()
        self._director.finish(self._decision, endpoint, outcome)

    def close(self, error: BaseException | None = None) -> None:
        endpoint = self._endpoint
        self.end_attempt()
        if self._decision.finished:
            return
        if isinstance(error, asyncio.CancelledError):
            outcome = Outcome(status=499, error="cancelled")
        elif error is not None:
            log.error("request %s failed after routing: %r", self._decision.request.request_id,
                      error)
            outcome = Outcome(status=500, error=f"{type(error).__name__}: {error}")
        else:
            outcome = Outcome(status=0, error="not finished")
        self._director.finish(self._decision, endpoint, outcome)

    async def __aenter__(self) -> RequestLifecycle:
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(exc)


class Director:
    """Resolves, admits and schedules requests; tracks what it dispatched."""

    def __init__(self, datastore: Datastore, registry: PluginRegistry,
                 metrics: RouterMetrics | None = None, services: SharedServices | None = None,
                 rng: random.Random | None = None) -> None:
        self.datastore = datastore
        self.registry = registry
        self.metrics = metrics or RouterMetrics()
        m = self.metrics  # the series every request touches, looked up without labels()
        self._decision_latency = Children(m.decision_latency)
        self._in_flight, self._requests = Children(m.in_flight), Children(m.requests)
        self._ttft, self._e2e = Children(m.ttft), Children(m.e2e)
        self._prefix_match, self._prefill_wait = Children(m.prefix_match), Children(m.prefill_wait)
        self._prefill_waits = Children(m.prefill_waits)
        self.services = services or SharedServices()
        self.rng = rng or random.Random()
        self.admission_hooks: list[AdmissionHook] = []
        self.completion_observers: list[CompletionObserver] = []
        self.dispatch_listeners: list[DispatchListener] = []
        self.answering_listeners: list[AnsweringListener] = []
        self._profiles: dict[tuple[str, str], tuple[int, SchedulerProfile]] = {}

    def add_admission_hook(self, hook: AdmissionHook) -> None:
        self.admission_hooks.append(hook)

    def add_completion_observer(self, observer: CompletionObserver) -> None:
        self.completion_observers.append(observer)

    def add_dispatch_listener(self, listener: DispatchListener) -> None:
        """``listener(decision, endpoint)`` runs on every attempt sent, synchronously: it must
        not block (replica sync queues a record)."""
        self.dispatch_listeners.append(listener)

    def add_answering_listener(self, listener: AnsweringListener) -> None:
        """``listener(decision, endpoint, first, backlog, first_byte)`` runs, synchronously,
        when an attempt that added ``backlog`` tokens to ``endpoint.prefill_backlog`` or
        registered ``first`` in ``endpoint.prefill_in_flight`` starts answering or ends, and
        at every attempt's first byte (``first_byte``)."""
        self.answering_listeners.append(listener)

    # ---- profiles ----------------------------------------------------------------------------
    def profile_for(self, resolution: Resolution, pool: PoolState) -> SchedulerProfile:
        key = (resolution.policy_key, pool.key)
        cached = self._profiles.get(key)
        version = self.datastore.version
        if cached is not None and cached[0] == version:
            return cached[1]
        scoring = resolution.policy.spec.scoring
        context = PluginContext(scoring=scoring, pool_key=pool.key, pool=pool.pool,
                                services=self.services, policy_key=resolution.policy_key,
                                admission=resolution.policy.spec.admission)
        profile = build_profile(self.registry, context, f"{resolution.policy_key}@{pool.key}")
        if cached is None or cached[1].degraded != profile.degraded:
            for wanted, stand_in in profile.degraded.items():
                self.metrics.degraded_scorers.labels(
                    resolution.policy.metadata.name, wanted, stand_in or "none").set(1)
        self._profiles[key] = (version, profile)
        return profile

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def count_retry(self, decision: DecisionView) -> None:
        self.metrics.retries.labels(decision.policy_name, decision.pool_name).inc()

    def count_per_try_extension(self, decision: DecisionView) -> None:
        self.metrics.per_try_extensions.labels(decision.policy_name, decision.pool_name).inc()

    # ---- routing -----------------------------------------------------------------------------
    async def open(self, request: LLMRequest, entrypoint: str = "proxy") -> RequestLifecycle:
        """Route ``request`` and dispatch its first attempt on the top-ranked endpoint, with
        no ``await`` in between (call it in the serving task: no ``wait_for``/``create_task``,
        so concurrent requests see each other's dispatches)."""
        decision = await self.route(request, entrypoint)
        routed = RequestLifecycle(self, decision)
        try:
            routed.dispatch(decision.endpoints[0])
        except BaseException as exc:
            routed.close(exc)
            raise
        return routed

    async def route(self, request: LLMRequest, entrypoint: str = "proxy") -> Decision:
        started = time.perf_counter()
        try:
            decision = await self._route(request, started)
        except RoutingError as exc:
            self.metrics.routing_errors.labels(str(exc.status)).inc()
            raise
        self._decision_latency(entrypoint).observe(decision.decided_in_s)
        return decision

    async def _route(self, request: LLMRequest, started: float) -> Decision:
        try:
            resolution = self.datastore.resolve(request.model, request.headers)
        except PolicyConflictError as exc:
            raise RoutingError(409, "policy_conflict", str(exc), param="model") from exc
        if resolution is None:
            known = ", ".join(self.datastore.models()) or "none"
            raise RoutingError(404, "model_not_found",
                               f"The model '{request.model}' does not exist; known models: "
                               f"{known}")
        policy = resolution.policy
        spec = policy.spec
        if request.tenant is None:
            request.tenant = request.headers.get(spec.tenancy.header) or \
                spec.tenancy.default_tenant
        self._check_limits(policy, request)

        admissions: list[Admission] = []
        waited = 0.0
        for hook in self.admission_hooks:
            hook_started = time.perf_counter()
            try:
                verdict = await hook.admit(request, resolution)
            except RoutingError as exc:
                if exc.status == 429:
                    self.metrics.shed.labels(policy.metadata.name, exc.reason).inc()
                self._release(admissions, None, Outcome(status=exc.status, error=exc.code))
                raise
            except BaseException:  # cancelled while queued: earlier hooks' holds are freed
                self._release(admissions, None, Outcome(status=499, error="cancelled"))
                raise
            waited += time.perf_counter() - hook_started
            if verdict is not None:
                admissions.append(verdict)

        allowed: set[str] | None = None
        preferred: set[str] = set()
        for verdict in admissions:
            if verdict.pools is not None:
                allowed = set(verdict.pools) if allowed is None else allowed & set(verdict.pools)
            if verdict.prefer is not None:
                preferred.update(verdict.prefer)

        order = self._pool_order(resolution, allowed)
        if preferred:  # stable: weighted order kept inside each group
            order.sort(key=lambda state: state.name not in preferred)
        adapters = {target.name: target.lora_adapter for _, target in resolution.pools}
        # Every pool first as it is; then, if none had a healthy endpoint but some failed only
        # their scrapes, once more under the healthy filter's panic rule (framework.endpoint
        # .serving): a metrics outage must not refuse a fleet that serves.
        try:
            for panic in (False, True):
                if panic and not any(panic_possible(pool.endpoints.values()) for pool in order):
                    break
                for pool in order:
                    request.lora_adapter = adapters.get(pool.name)
                    profile = self.profile_for(resolution, pool)
                    state = CycleState()
                    if panic:
                        state.write(STATE_HEALTH_PANIC, True)
                    ranked = profile.run(state, request, list(pool.endpoints.values()),
                                         limit=max(1, spec.retries.max_attempts))
                    if ranked:
                        # Time spent waiting in admission hooks (queueing) is not decision cost.
                        decided = time.perf_counter() - started - waited
                        return Decision(request=request, policy=policy,
                                        policy_key=resolution.policy_key, pool=pool,
                                        profile=profile, state=state, ranked=ranked,
                                        decided_in_s=decided, admissions=admissions)
        except BaseException as exc:  # a plugin raised: what the hooks admitted is freed
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("scheduling request %s failed", request.request_id)
            self._release(admissions, None, Outcome(
                status=499 if isinstance(exc, asyncio.CancelledError) else 500,
                error=f"scheduling failed: {type(exc).__name__}"))
            raise
        self._release(admissions, None, Outcome(status=503, error="no_endpoint"))
        raise RoutingError(503, "no_endpoint_available",
                           f"No ready endpoint serves model '{request.model}' right now "
                           f"(policy {resolution.policy_key}); retry later")

    def _check_limits(self, policy: RoutePolicy, request: LLMRequest) -> None:
        """``maxOutputTokens`` against the bound the engine will use (``request.max_tokens``;
        absent or null: the limit becomes the bound, written upstream), and
        ``maxPromptTokens`` against the largest prompt's low estimate."""
        admission = policy.spec.admission
        limit = admission.max_output_tokens
        if limit is not None:
            if request.max_tokens is None:
                request.max_tokens = limit
            elif request.max_tokens > limit:
                raise RoutingError(400, "invalid_request_error",
                                   f"{request.output_param} {request.max_tokens} exceeds the "
                                   f"limit of {limit} for model '{request.model}'",
                                   param=request.output_param)
        if admission.max_prompt_tokens is not None:
            size = request.prompt_size_estimate()
            if size > admission.max_prompt_tokens:
                raise RoutingError(413, "context_length_exceeded",
                                   f"The prompt has about {size} tokens; model "
                                   f"'{request.model}' accepts at most "
                                   f"{admission.max_prompt_tokens}")

    def _pool_order(self, resolution: Resolution, allowed: set[str] | None) -> list[PoolState]:
        primaries: list[tuple[PoolState, int]] = []
        fallbacks: list[PoolState] = []
        for state, target in resolution.pools:
            if state is None or not state.endpoints:
                continue
            if allowed is not None and target.name not in allowed:
                continue
            if target.role == "primary" and target.weight > 0:
                primaries.append((state, target.weight))
            else:
                fallbacks.append(state)
        ordered: list[PoolState] = []
        while primaries:  # weighted random order, without replacement
            total = sum(w for _, w in primaries)
            point = self.rng.random() * total
            for i, (state, weight) in enumerate(primaries):
                point -= weight
                if point <= 0 or i == len(primaries) - 1:
                    ordered.append(state)
                    del primaries[i]
                    break
        return ordered + fallbacks

    # ---- bookkeeping -------------------------------------------------------------------------
    def dispatch(self, decision: Decision, endpoint: Endpoint) -> None:
        """The request is being sent to ``endpoint`` (call once per attempt)."""
        endpoint.in_flight += 1
        decision.dispatch_numbers[endpoint.name] = endpoint.dispatched()
        # The prompt tokens it must compute (what it did not hold by the decision's prefix
        # match) wait in its prefill backlog until the answer starts.
        self.answering(decision, endpoint)  # a second attempt on the same endpoint
        amount = decision.request.prefill_tokens(decision.prefix_match_ratio(endpoint))
        decision.prefill_backlog[endpoint.name] = amount
        endpoint.add_prefill_backlog(amount, decision.newest_first_at_engines)
        if decision.prefill_wait_s > 0 or decision.priority_engines:
            self._start_prefill(decision, endpoint)
        self._in_flight(decision.pool.name, endpoint.name).inc()
        decision.profile.dispatched(decision.state, decision.request, endpoint)
        for listener in self.dispatch_listeners:
            listener(decision, endpoint)

    @staticmethod
    def _start_prefill(decision: Decision, endpoint: Endpoint) -> None:
        """Register the prefix this attempt makes ``endpoint`` compute (from the first block
        it did not hold), so later requests matching it can wait for it
        (:meth:`wait_for_prefill`)."""
        blocks = decision.prompt_blocks(endpoint)
        if blocks is None:
            return
        hashes, held = blocks
        if held >= len(hashes):
            return  # nothing new to compute
        first = hashes[held]
        if first not in endpoint.prefill_in_flight:  # not computed by another attempt already
            # the priority its body carries (every attempt sends the first endpoint's)
            flight = PrefillInFlight(decision.engine_priority(decision.endpoints[0]))
            endpoint.prefill_in_flight[first] = flight
            decision.prefill_started[endpoint.name] = (first, flight)

    def answering(self, decision: Decision, endpoint: Endpoint, first_byte: bool = False) -> None:
        """The attempt on ``endpoint`` started answering: its prompt is computed, so it leaves
        the endpoint's prefill backlog, and requests waiting for its prefix go on (once;
        :meth:`end_attempt` does it otherwise). ``first_byte``: this is the attempt's first
        byte (once per attempt), counted in ``Endpoint.answers_started``."""
        if first_byte:
            endpoint.answers_started += 1
            # Its prompt is computed: not waiting, whatever the last page says. Counted
            # until its end, an engine's page a period old showed every dispatch of that
            # period as waiting (the load-headroom filter and admission read it): at the 1 s
            # accounted period, 64 emulated engines at 600 req/s, request imbalance 1.46
            # against 1.26 at the 100 ms one; 1.29 with this (emulated-fleet round 50).
            self._not_waiting(decision, endpoint)
        amount = decision.prefill_backlog.pop(endpoint.name, 0.0)
        if amount:
            endpoint.remove_prefill_backlog(amount, decision.newest_first_at_engines)
        started = decision.prefill_started.pop(endpoint.name, None)
        first: int | None = None
        if started is not None:
            first, flight = started
            if endpoint.prefill_in_flight.get(first) is flight:
                del endpoint.prefill_in_flight[first]
            flight.done.set()
        if amount or first is not None or first_byte:
            for listener in self.answering_listeners:
                listener(decision, endpoint, first, amount, first_byte)

    async def wait_for_prefill(self, decision: Decision, endpoint: Endpoint,
                               limit_s: float) -> float:
        """Wait, at most ``limit_s``, while ``endpoint`` computes a prefix of this prompt
        that it held only as *pending* at the decision (another attempt of this router is
        computing it and has not started answering); returns the seconds waited. Sent at
        once, the request would make the engine compute those blocks a second time beside
        the first (vLLM caches a block only once computed); after the wait they are hits."""
        if limit_s <= 0 or not endpoint.prefill_in_flight:
            return 0.0
        blocks = decision.prompt_blocks(endpoint)
        if blocks is None:
            return 0.0
        hashes, held = blocks
        started_here = decision.prefill_started.get(endpoint.name)
        own = started_here[1] if started_here else None  # this attempt's own prefill
        # (the order of the waits does not matter, every one is awaited)
        events = [flight.done for flight in endpoint.prefills_reused(hashes[:held])
                  if flight is not own]
        if not events:
            return 0.0
        started = time.monotonic()
        outcome = "answered"
        try:
            async with asyncio.timeout(limit_s):
                for event in events:
                    await event.wait()
        except TimeoutError:
            outcome = "timeout"
        waited = time.monotonic() - started
        self._prefill_waits(decision.pool.name, outcome).inc()
        self._prefill_wait(decision.pool.name).observe(waited)
        return waited

    def end_attempt(self, decision: Decision, endpoint: Endpoint) -> None:
        """An attempt on ``endpoint`` is over (successful or not)."""
        self.answering(decision, endpoint)
        endpoint.in_flight = max(0, endpoint.in_flight - 1)
        self._not_waiting(decision, endpoint)  # unless its first byte did it already
        self._in_flight(decision.pool.name, endpoint.name).dec()

    @staticmethod
    def _not_waiting(decision: Decision, endpoint: Endpoint) -> None:
        """The attempt on ``endpoint`` answers or ended: off its waiting count (once)."""
        number = decision.dispatch_numbers.pop(endpoint.name, None)
        if number is not None:
            endpoint.answered(number)

    def mark_unavailable(self, endpoint: Endpoint, for_s: float = 2.0) -> None:
        """The endpoint refused a connection: keep it out of picks for ``for_s`` seconds."""
        endpoint.unavailable_until = time.monotonic() + for_s

    def finish(self, decision: Decision, endpoint: Endpoint | None, outcome: Outcome) -> None:
        """The request is over: record metrics and tell hooks and observers (once)."""
        if decision.finished:
            return
        decision.finished = True
        policy, pool = decision.policy_name, decision.pool.name
        self._requests(policy, pool, endpoint.name if endpoint else "",
                       str(outcome.status)).inc()
        if outcome.ttft_s is not None:
            self._ttft(policy, pool).observe(outcome.ttft_s)
        if outcome.e2e_s is not None:
            self._e2e(policy, pool).observe(outcome.e2e_s)
        if endpoint is not None:
            ratio = decision.prefix_match_ratio(endpoint)
            if ratio is not None:
                self._prefix_match(policy, pool).observe(ratio)
        self._release(decision.admissions, decision, outcome)
        for observer in self.completion_observers:
            try:
                observer.on_complete(decision, outcome)
            except Exception:
                log.exception("completion observer failed")

    @staticmethod
    def _release(admissions: Sequence[Admission], decision: Decision | None,
                 outcome: Outcome) -> None:
        for admission in admissions:
            if admission.on_finish is not None:
                try:
                    admission.on_finish(decision, outcome)
                except Exception:
                    log.exception("admission on_finish failed")


__all__ = ["Admission", "AdmissionHook", "CompletionObserver", "Decision", "Director", "Outcome",
           "RequestLifecycle", "RoutingError"]
