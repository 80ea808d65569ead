"""The director's admission hook for budgets, admission control and batch-level routing.

One :class:`BudgetHook` per router (``Director.add_admission_hook``); it keeps, per RoutePolicy,
an :class:`AdmissionController` and a :class:`BatchRouter`, over one shared
:class:`BudgetLedger`; tenants come from the router's :class:`TenantDirectory`.
Per request (``admit``):

1. **tenant** — ``source: Header``: ``request.tenant`` as the entry point left it. The director
   takes it from the tenancy header, which reaches the request only from a trusted hop
   (:mod:`kvroute_router.trust`, docs/security.md): the proxy drops it from clients outside
   ``--trusted-proxy-cidr``, ext_proc unless ``--ext-proc-trust-gateway-headers``; gRPC Pick's
   tenant is its authenticated caller. ``source: APIKey``: the bearer token's SHA-256
   digest looked up in the policy's key table — the Secret named by ``apiKeysSecretRef`` as the
   Kubernetes source hashed it into the datastore, plus any embedded mapping (``api_keys``);
   unknown → ``defaultTenant``.
2. **admission** — the priority class from ``x-kvroute-priority``; when every endpoint of the
   policy's pools is saturated, sheddable classes get 429 at once, others queue (bounded, with a
   timeout) until released.
3. **batch stage** — only when the tenant has a USD budget and the policy has two or more
   priced candidate pools: ``BatchRouter.assign`` picks the pool (adaptive window: never waits
   when the budget and capacity do not bind). ``None`` (no pool fits budget and capacity) → 429.
4. **budget** — ``BudgetLedger.reserve`` with an upper-bound estimate (prompt: token ids, else
   UTF-8 bytes, over every prompt, tools schemas, images and the chat template; output: the
   engine's bound ``max_tokens``, else ``maxOutputTokens``, else the router default, which is
   then written into the forwarded body, times ``max(n, best_of)``) on the chosen pool first,
   then the others cheapest first — the policy's fallback pools with endpoints included as
   downgrade targets. Refused → 429 naming the budget with ``Retry-After``;
   ``onExhausted: Downgrade`` → the request is restricted to the cheaper pool the ledger
   reserved. The store failing (Redis refused, timed out) → ``budgetStore.onError``: admitted
   unmetered, or 503 ``budget_store_unavailable``.
5. **finish** — ``on_finish`` settles the reservation on the pool that actually served it,
   with what :func:`~kvroute_router.budget.accounting.charge_for` says: the engine's usage
   from a trustworthy witness, else the reservation; refunded only when the attempt provably
   produced nothing (docs/security.md). Every finished request, budgeted or not, releases
   queued requests as far as the endpoints have room (``on_complete``: the hook is the
   director's ``CompletionObserver`` too).

Policies are re-read whenever the datastore's version changes (config-file reload or a
Kubernetes watch event, including an API-key Secret's): limits, admission, batching and
tenancy settings apply to the next request; meters keep their history. Everything budgetary is
keyed by the policy's ``namespace/name`` (the datastore key), so same-named policies in two
namespaces have separate meters, Redis keys and metric series (``policy_namespace`` label).
A background task releases queued requests as metrics refresh and refreshes the
``kvroute_budget_window_spend_usd`` / ``limit_usd`` gauges.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from kvroute_api.route_policy import BudgetSpec, RoutePolicy, RoutePolicySpec

from kvroute_router.admission.controller import AdmissionController, EndpointLoad, WaitingKey
from kvroute_router.admission.tenancy import ApiKeyLookup, TenantDirectory
from kvroute_router.batching.batcher import BatchRequest, BatchRouter
from kvroute_router.batching.batcher import PoolState as BatchPoolState
from kvroute_router.batching.quality import HeuristicQualityEstimator, QualityEstimator
from kvroute_router.budget.accounting import charge_for
from kvroute_router.budget.ledger import (
    BudgetDecision,
    BudgetLedger,
    RequestEstimate,
    Reservation,
)
from kvroute_router.budget.metrics import BudgetMetrics
from kvroute_router.budget.pricing import PoolEconomics
from kvroute_router.datastore.store import Datastore, PoolState, Resolution, object_key
from kvroute_router.director import Admission, Decision, Outcome, RoutingError
from kvroute_router.framework.endpoint import serving
from kvroute_router.framework.request import LLMRequest
from kvroute_router.framework.tasks import cancel_and_wait

log = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT_TOKENS = 1024
"""Output bound of a request that names no ``max_tokens`` when its policy sets no
``maxOutputTokens``; written into the forwarded body so the settle cannot exceed it."""

def prompt_tokens_upper_bound(request: LLMRequest) -> int:
    """Prompt tokens, never underestimated (:meth:`LLMRequest.prompt_upper_bound`: every
    prompt of a list, tools schemas, images and the chat template)."""
    return request.prompt_upper_bound()


@dataclass
class _Policy:
    """Per-policy state of the hook."""

    name: str
    key: str
    """``namespace/name``: the ledger's, the controller's and the batcher's policy id."""
    policy: RoutePolicy
    controller: AdmissionController
    batcher: BatchRouter
    economics: dict[str, PoolEconomics] = field(default_factory=dict)


class BudgetHook:
    """Budgets, admission control and batch routing on the director's request path."""

    def __init__(self, datastore: Datastore, *, metrics: BudgetMetrics | None = None,
                 ledger: BudgetLedger | None = None, estimator: QualityEstimator | None = None,
                 api_keys: ApiKeyLookup | None = None, tenants: TenantDirectory | None = None,
                 default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
                 robust_kappa: float = 0.0, refresh_interval_s: float = 0.1,
                 gauge_interval_s: float = 10.0) -> None:
        self.datastore = datastore
        self.metrics = metrics
        self.ledger = ledger or BudgetLedger(metrics=metrics)
        if self.ledger.metrics is None:
            self.ledger.metrics = metrics
        self.estimator = estimator or HeuristicQualityEstimator()
        self.tenants = tenants or TenantDirectory(datastore, api_keys)
        """Who a request's tenant is; the app shares one directory with the response cache."""
        self.default_max_output_tokens = default_max_output_tokens
        self.robust_kappa = robust_kappa
        self.refresh_interval_s = refresh_interval_s
        self.gauge_interval_s = gauge_interval_s
        self.replicas: Callable[[], int] | None = None
        """The router replicas sharing the engines (replica sync's count), for each policy's
        admission queue; set before the first request, None: one."""
        self.peers_waiting: Callable[[str], Sequence[WaitingKey]] | None = None
        """The other replicas' waiters by policy key (replica sync's reports): each queue
        lets go only its own among the fleet's oldest. None: none known."""
        self.waiting_changed: Callable[[], None] | None = None
        """Called when any policy's queue changes (replica sync reports :meth:`waiting`)."""
        self._policies: dict[str, _Policy] = {}
        self._implicit: dict[str, _Policy] = {}
        """Default policies of directly reachable served names, by ``implicit/<model>``."""
        self._version = -1
        self._active: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pump: asyncio.Task[None] | None = None

    # ---- policies ----------------------------------------------------------------------------
    def sync(self) -> None:
        """Follow the datastore's policies (added, edited, deleted)."""
        version = self.datastore.version
        if version == self._version:
            return
        self._version = version
        current = self.datastore.policies()
        for key in [k for k in self._policies if k not in current]:
            self._policies.pop(key)
            self.ledger.remove_policy(key)
        self.tenants.forget(set(current))
        for key, policy in current.items():
            state = self._policies.get(key)
            if state is None:
                self._policies[key] = self._create(key, policy)
                continue
            if state.policy is policy:
                continue
            old, new = state.policy.spec, policy.spec
            state.policy = policy
            if (old.budgets != new.budgets or old.budget_store != new.budget_store
                    or old.request_timeout_seconds != new.request_timeout_seconds):
                self.ledger.update_policy(key, new.budgets,
                                          request_timeout_s=float(new.request_timeout_seconds),
                                          store=new.budget_store)
            if old.admission != new.admission:
                state.controller.update_spec(new.admission)
            if old.batching != new.batching:
                state.batcher.update_batching(new.batching)
        for state in [*self._policies.values(), *self._implicit.values()]:
            state.economics = {}

    def _implicit_state(self, resolution: Resolution) -> _Policy:
        """The per-model state of the default policy implied by directly reachable pools."""
        key = resolution.policy_key
        state = self._implicit.get(key)
        if state is None:
            state = self._create(key, resolution.policy)
            self._implicit[key] = state
        else:  # the pools serving the name may change; the queue and its waiters stay
            state.policy = resolution.policy
        return state

    def _create(self, key: str, policy: RoutePolicy) -> _Policy:
        name = policy.metadata.name
        spec = policy.spec
        self.ledger.update_policy(key, spec.budgets,
                                  request_timeout_s=float(spec.request_timeout_seconds),
                                  store=spec.budget_store)
        state = _Policy(
            name=name, key=key, policy=policy,
            controller=AdmissionController(key, spec.admission, lambda: self._load(key),
                                           metrics=self.metrics, replicas=self.replicas,
                                           peers_waiting=lambda: self._peers_waiting(key),
                                           on_change=self._waiting_changed),
            batcher=BatchRouter(key, spec.batching, self.estimator,
                                lambda: self._batch_pools(key), self.ledger,
                                robust_kappa=self.robust_kappa, metrics=self.metrics))
        return state

    def waiting(self, limit: int) -> dict[str, list[WaitingKey]]:
        """Every policy's first ``limit`` waiters' order keys, by policy key (the queues with
        waiters only): what replica sync tells the other replicas."""
        return {state.key: state.controller.waiting_keys(limit)
                for state in [*self._policies.values(), *self._implicit.values()]
                if state.controller.queue_depth}

    def _peers_waiting(self, key: str) -> Sequence[WaitingKey]:
        return self.peers_waiting(key) if self.peers_waiting is not None else ()

    def _waiting_changed(self) -> None:
        if self.waiting_changed is not None:
            self.waiting_changed()

    def _candidates(self, key: str) -> list[PoolState]:
        """The policy's pools that can take traffic now: primaries with endpoints, else the
        fallbacks with endpoints (the director's order of precedence)."""
        primaries, fallbacks = self._pools_by_role(key)
        return primaries or fallbacks

    def _state(self, key: str) -> _Policy | None:
        return self._policies.get(key) or self._implicit.get(key)

    def _pools_by_role(self, key: str) -> tuple[list[PoolState], list[PoolState]]:
        """(primaries, fallbacks) of the policy that have endpoints."""
        state = self._state(key)
        if state is None:
            return [], []
        namespace = state.policy.metadata.namespace
        primaries: list[PoolState] = []
        fallbacks: list[PoolState] = []
        for target in state.policy.spec.pools:
            pool = self.datastore.pool(object_key(namespace, target.name))
            if pool is None or not pool.endpoints:
                continue
            if target.role == "primary" and target.weight > 0:
                primaries.append(pool)
            else:
                fallbacks.append(pool)
        return primaries, fallbacks

    def _economics(self, state: _Policy, pool: PoolState) -> PoolEconomics:
        cached = state.economics.get(pool.name)
        # The healthy filter's rule (the healthy ones, else under the panic rule the reachable
        # ones): a pool is priced with the replicas it would route among.
        ready = len(serving(list(pool.endpoints.values()), panic=True))
        if cached is None or cached.replicas != max(1, ready):
            cached = PoolEconomics.from_spec(pool.name, pool.pool.spec,
                                             ready_replicas=max(1, ready))
            state.economics[pool.name] = cached
        return cached

    def _batch_pools(self, key: str) -> list[BatchPoolState]:
        state = self._state(key)
        if state is None:
            return []
        return [BatchPoolState(self._economics(state, pool),
                               in_flight=int(sum(ep.running_estimate()
                                                 for ep in pool.endpoints.values())))
                for pool in self._candidates(key)]

    def _load(self, key: str) -> Iterator[EndpointLoad]:
        """The load of each candidate endpoint the router would route to (the healthy filter's
        rule, panic included: when every scrape fails, the router's own in-flight counts still
        say which engines are full), computed as it is asked for (admission stops at the first
        endpoint with room)."""
        state = self._state(key)
        stale_s = (state.policy.spec.scoring.stale_metrics_ms / 1000.0) if state else 1.0
        for pool in self._candidates(key):
            for ep in serving(list(pool.endpoints.values()), panic=True):
                kv = 0.0
                if ep.metrics is not None and not ep.metrics_stale(stale_s):
                    kv = ep.metrics.kv_cache_usage
                yield EndpointLoad(waiting=int(ep.waiting_estimate()), kv_utilization=kv)

    # ---- the hook ----------------------------------------------------------------------------
    async def admit(self, request: LLMRequest, resolution: Resolution) -> Admission | None:
        """The steps of the module docstring, in order; None when nothing is enforced."""
        self.sync()
        # A served name reached directly gets the default policy's limits (docs/security.md).
        state = (self._implicit_state(resolution) if resolution.implicit
                 else self._policies.get(resolution.policy_key))
        if state is None:
            return None
        tenant = self._resolve_tenant(state, request)
        await self._admission_control(state, request, tenant)
        budgets = self.ledger.budgets_for(state.key, tenant)
        if not budgets:
            return None  # nothing to account; the director's weighted pool order applies
        self._active.add((state.key, tenant))
        primaries, fallbacks = self._pools_by_role(resolution.policy_key)
        candidates = primaries or fallbacks
        if not candidates:
            return None  # the director answers 503
        economics = [self._economics(state, pool) for pool in candidates]
        # Fallback pools are where a Downgrade budget may send a request too (the ledger only
        # moves to a pool cheaper than the preferred one).
        downgrades = [self._economics(state, pool) for pool in fallbacks] if primaries else []
        estimate = self._estimate(state.policy.spec, request)
        ordered, restrict = await self._order_pools(state, request, tenant, budgets, economics,
                                                    estimate)
        decision = await self._reserve(state, tenant, [*ordered, *downgrades], estimate)
        if decision.unmetered:  # the store failed and the policy fails open
            return Admission(pools=[decision.pool] if restrict and decision.pool else None,
                             on_finish=lambda d, o: self._release_next(state))
        reservation = decision.reservation
        assert reservation is not None and decision.pool is not None
        pools = [decision.pool] if (restrict or decision.downgraded) else None
        return Admission(pools=pools, on_finish=lambda d, o: self._finished(
            state, reservation, estimate, d, o))

    # ---- the steps of admit ------------------------------------------------------------------
    def _resolve_tenant(self, state: _Policy, request: LLMRequest) -> str:
        """Step 1: the request's tenant (written back to ``request.tenant``)."""
        tenant = self.tenants.tenant_of(state.policy, request.headers, request.tenant)
        request.tenant = tenant
        return tenant

    async def _admission_control(self, state: _Policy, request: LLMRequest, tenant: str) -> None:
        """Step 2: shed or queue by priority class when every endpoint is saturated."""
        controller = state.controller
        def newest_first() -> None:
            request.newest_first = True

        error = await controller.admit(controller.priority_of(request.headers),
                                       on_newest_first=newest_first)
        if error is not None:
            self.ledger.count_requests(state.key, tenant,
                                       self.ledger.budgets_for(state.key, tenant), "shed")
            raise RoutingError(error.status, error.code, error.message,
                               retry_after=error.retry_after_s, param=error.param)

    def _estimate(self, spec: RoutePolicySpec, request: LLMRequest) -> RequestEstimate:
        """The upper-bound estimate the ledger reserves; a request without ``max_tokens`` gets
        the bound written into its forwarded body, so usage cannot exceed the estimate."""
        max_output = (request.max_tokens if request.max_tokens is not None
                      else spec.admission.max_output_tokens or self.default_max_output_tokens)
        if request.max_tokens is None:
            request.max_tokens = max_output  # forwarded, so usage cannot exceed the estimate
        # Each of the n / best_of sequences may generate the whole bound.
        max_output *= max(1, request.sequences)
        return RequestEstimate(prompt_tokens_upper_bound(request), max_output)

    async def _order_pools(self, state: _Policy, request: LLMRequest, tenant: str,
                           budgets: Sequence[BudgetSpec], economics: list[PoolEconomics],
                           estimate: RequestEstimate) -> tuple[list[PoolEconomics], bool]:
        """Step 3: the pools to reserve on, preferred first, and whether the request is
        restricted to the one reserved (the batch stage chose it)."""
        batched = (len(economics) > 1 and any(e.priced for e in economics)
                   and self.ledger.usd_limit_per_second(state.key, tenant) is not None)
        if batched:
            choice = await state.batcher.assign(BatchRequest(
                request.prompt_text, estimate.prompt_tokens, estimate.max_output_tokens, tenant))
            if choice.pool is None:
                state.controller.release_waiting()
                self.ledger.count_requests(state.key, tenant, budgets, "shed")
                raise RoutingError(429, "capacity_exhausted",
                                   f"no pool of policy '{state.name}' has capacity and budget "
                                   f"for this request now (tenant '{tenant}')",
                                   retry_after=1.0, reason="capacity_exhausted")
            preferred = next(e for e in economics if e.name == choice.pool)
            return [preferred, *(e for e in economics if e.name != choice.pool)], True
        if len(economics) > 1:
            # The director picks among the pools by weight: reserve the dearest (upper bound).
            return sorted(economics, key=lambda e: -e.request_usd(
                estimate.prompt_tokens, estimate.max_output_tokens)), False
        return economics, False

    async def _reserve(self, state: _Policy, tenant: str, pools: list[PoolEconomics],
                       estimate: RequestEstimate) -> BudgetDecision:
        """Step 4: reserve the estimate on the first pool the budgets allow; 429 if none (503
        when the store failed and the policy fails closed). An ``unmetered`` decision means the
        store failed and the policy fails open."""
        decision = await self.ledger.reserve(state.key, tenant, pools, estimate)
        if decision.unmetered:
            return decision
        if decision.error is not None or decision.reservation is None or decision.pool is None:
            state.controller.release_waiting()
            err = decision.error
            raise RoutingError(err.status if err else 429,
                               err.code if err else "budget_exhausted",
                               err.message if err else "budget exhausted",
                               retry_after=err.retry_after_s if err else None,
                               reason=err.code if err else "budget_exhausted",
                               param=err.param if err else None)
        return decision

    # ---- finishing ---------------------------------------------------------------------------
    @staticmethod
    def _release_next(state: _Policy) -> None:
        state.controller.release_waiting()

    def _finished(self, state: _Policy, reservation: Reservation, estimate: RequestEstimate,
                  decision: Decision | None, outcome: Outcome) -> None:
        try:
            task = asyncio.get_running_loop().create_task(
                self._settle(state, reservation, estimate, decision, outcome))
        except RuntimeError:  # no loop (shutdown): the in-flight deadline frees the slot
            log.warning("cannot settle budget reservation of %s: no event loop", state.name)
        else:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        state.controller.release_waiting()

    async def _settle(self, state: _Policy, reservation: Reservation,
                      estimate: RequestEstimate, decision: Decision | None,
                      outcome: Outcome) -> None:
        try:
            charge = charge_for(decision is not None, outcome, estimate)
            if charge.refund or decision is None:
                await self.ledger.cancel(reservation)
                return
            pool = self._economics(state, decision.pool)
            await self.ledger.settle(reservation, pool, charge.prompt_tokens,
                                     charge.output_tokens)
        except Exception:
            log.exception("settling the budget reservation of policy %s failed", state.name)

    # ---- background --------------------------------------------------------------------------
    async def start(self) -> None:
        self.sync()
        self._pump = asyncio.get_running_loop().create_task(self._run(), name="budget-hook")

    async def stop(self) -> None:
        if self._pump is not None:
            await cancel_and_wait([self._pump], what="budget hook")
            self._pump = None
        if not await self.settled(5.0):
            log.warning("budget settles still running at shutdown; the in-flight deadline "
                        "frees their slots")

    async def settled(self, timeout_s: float) -> bool:
        """Wait for the settles of finished requests (they run as tasks); False if some are
        still running after ``timeout_s``."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        return not self._tasks

    def release_queued(self) -> None:
        """Let every policy's queued requests go as far as its endpoints have room."""
        for state in [*self._policies.values(), *self._implicit.values()]:
            if state.controller.queue_depth:
                state.controller.release_waiting()

    def on_complete(self, decision: Decision, outcome: Outcome) -> None:
        """A request ended (``CompletionObserver``, every policy's and with or without a
        budget): its engine has room for a queued one."""
        self.release_queued()

    async def _run(self) -> None:
        next_gauges = 0.0
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            try:
                self.sync()
                self.release_queued()
                if time.monotonic() >= next_gauges:
                    next_gauges = time.monotonic() + self.gauge_interval_s
                    await self.refresh_gauges()
            except Exception:
                log.exception("budget hook refresh failed")

    def sizes(self) -> dict[str, int]:
        """Entries of the hook's tables and its ledger's (``kvroute_internal_entries``)."""
        return {"admission_controllers": len(self._policies) + len(self._implicit),
                "admission_waiters": sum(state.controller.queue_depth for state in
                                         [*self._policies.values(), *self._implicit.values()]),
                "budget_tracked_tenants": len(self._active),
                "budget_background_tasks": len(self._tasks),
                **self.ledger.sizes()}

    async def refresh_gauges(self) -> None:
        """Window spend and limit gauges of every (policy, tenant) that spent recently. A tenant
        with nothing left in its USD windows (or no USD budget) leaves the set once its gauges
        read 0 and joins again with its next request: the set, and this loop, were one entry
        per tenant ever seen (kvroute_internal_entries{table="budget_tracked_tenants"})."""
        for policy, tenant in list(self._active):
            if (not self.ledger.budgets_for(policy, tenant)
                    or await self.ledger.usd_idle(policy, tenant)):
                self._active.discard((policy, tenant))


__all__ = ["DEFAULT_MAX_OUTPUT_TOKENS", "BudgetHook", "prompt_tokens_upper_bound"]
