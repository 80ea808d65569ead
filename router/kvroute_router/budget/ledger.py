"""Budget ledgers: per-tenant USD, token, request and concurrency limits from
``RoutePolicy.spec.budgets``, enforced by reserve-then-settle accounting.

At admission the router calls ``BudgetLedger.reserve`` with the candidate pools (preferred
first) and an *upper-bound* estimate of the request (prompt tokens counted, output tokens =
``max_tokens`` or the policy's default). Every applicable budget's meters are checked and
charged atomically, so concurrent requests cannot together overspend. When the response is
done, ``settle`` corrects the charge to the real token counts and releases the concurrency
slot; ``cancel`` undoes a request that never reached an engine.

When a USD limit does not fit the preferred pool and the budget says ``onExhausted:
Downgrade``, the cheapest candidate the budget still affords is reserved instead; otherwise the
decision carries a 429 with ``Retry-After`` and an OpenAI-style error naming the budget.

``update_policy`` replaces a policy's limits in place (meters keep their history, so an edit
applies to the next request). A concurrency slot is held until its request settles, or at most
the policy's ``requestTimeoutSeconds`` plus ``DEADLINE_MARGIN_S`` (a replica that dies holding
slots leaks them no longer than that); ``in_flight_deadline_s`` applies to a policy installed
without a request timeout. Without a shared store each replica enforces
``replica_share`` x each limit.

**Store failures.** Every store call is bounded by the policy's ``budgetStore.timeoutMs``. A
reservation the store cannot make (refused connection, timeout, any store error) follows
``budgetStore.onError``: ``FailOpen`` admits the request unmetered (``BudgetDecision.unmetered``;
nothing to settle), ``FailClosed`` refuses it with 503 ``budget_store_unavailable``. After a
failed reservation the store is not asked again for ``STORE_PROBE_S``: requests in between get
``onError`` at once instead of each waiting out the timeout (one probe per interval). A failed
settle correction is dropped (logged); a failed concurrency release is retried with backoff for
``RELEASE_RETRY_S`` and otherwise expires at the slot's deadline. Every failure counts in
``kvroute_budget_store_errors_total`` and is logged (at most once per ``LOG_EVERY_S`` per policy
and operation).

Policies are identified by ``namespace/name`` (the datastore's key; a bare name is
``default/name``): meter keys (also the Redis keys), the budgets table and the metric labels
(``policy_namespace``, ``policy``) all carry the namespace, so same-named policies in two
namespaces never share state.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from kvroute_api.route_policy import BudgetSpec, BudgetStoreSpec

from kvroute_router.budget.meters import InMemoryMeterStore, MeterCharge, MeterStore
from kvroute_router.budget.metrics import BudgetMetrics, policy_id, policy_labels
from kvroute_router.budget.pricing import PoolEconomics

WINDOW_SECONDS: dict[str, float] = {"1m": 60.0, "1h": 3600.0, "1d": 86400.0,
                                    "7d": 7 * 86400.0, "30d": 30 * 86400.0}
MINUTE = 60.0
RELEASE_RETRY_S = 15.0
"""How long a failed concurrency release is retried (backoff 0.25 s doubling, up to 4 s)."""
LOG_EVERY_S = 10.0
STORE_PROBE_S = 1.0
"""After a failed reservation, how long requests skip the store (and get ``onError`` at once)."""
log = logging.getLogger(__name__)
DEADLINE_MARGIN_S = 30.0
"""Slack past a policy's request timeout before its concurrency slots expire: the settle of a
request that ran to its timeout must land before its slot expires."""
_MEMBER_COUNTER = itertools.count()


@dataclass(frozen=True)
class ApiError:
    """An HTTP refusal with an OpenAI-style body."""

    status: int
    message: str
    type: str
    code: str
    param: str | None = None
    retry_after_s: float | None = None

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}


@dataclass(frozen=True)
class RequestEstimate:
    """What the request will use at most (output = max_tokens or the policy default)."""

    prompt_tokens: int
    max_output_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.max_output_tokens


@dataclass(frozen=True)
class Reservation:
    """Charges held for one admitted request until it is settled or cancelled."""

    policy: str
    tenant: str
    pool: str
    member: str
    charged_at: float
    charges: tuple[tuple[str, MeterCharge], ...]
    estimate: RequestEstimate
    usd: float


@dataclass(frozen=True)
class BudgetDecision:
    """Outcome of ``reserve``: a pool and a reservation, or a refusal."""

    pool: str | None
    reservation: Reservation | None
    downgraded: bool = False
    error: ApiError | None = None
    unmetered: bool = False
    """The store failed and the policy fails open: admitted on ``pool`` with no reservation."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def admitted(self) -> bool:
        return self.reservation is not None


@dataclass(frozen=True)
class _Limit:
    budget: BudgetSpec
    field: str
    kind: str  # "usd" | "tokens" | "requests" | "concurrency"
    value: float
    window_s: float


def _limits_of(budget: BudgetSpec, share: float) -> list[_Limit]:
    limits: list[_Limit] = []
    if budget.usd is not None:
        limits.append(_Limit(budget, "usd", "usd", budget.usd * share,
                             WINDOW_SECONDS[budget.window]))
    if budget.tokens_per_minute is not None:
        limits.append(_Limit(budget, "tokensPerMinute", "tokens",
                             budget.tokens_per_minute * share, MINUTE))
    if budget.requests_per_minute is not None:
        limits.append(_Limit(budget, "requestsPerMinute", "requests",
                             budget.requests_per_minute * share, MINUTE))
    if budget.max_concurrency is not None:
        limits.append(_Limit(budget, "maxConcurrency", "concurrency",
                             max(1.0, math.floor(budget.max_concurrency * share)), 0.0))
    return limits


_METRIC_LIMIT = {"usd": "usd", "tokens": "tokens_per_minute", "requests": "requests_per_minute",
                 "concurrency": "max_concurrency"}


class BudgetLedger:
    """Budgets of every policy, over one ``MeterStore``; see the module docstring."""

    def __init__(self, store: MeterStore | None = None, *, replica_share: float = 1.0,
                 metrics: BudgetMetrics | None = None,
                 clock: Callable[[], float] = time.time,
                 in_flight_deadline_s: float = 600.0,
                 store_probe_s: float = STORE_PROBE_S) -> None:
        if not 0 < replica_share <= 1:
            raise ValueError(f"replica_share must be in (0, 1], got {replica_share}")
        self.store: MeterStore = store or InMemoryMeterStore()
        self.replica_share = replica_share
        self.metrics = metrics
        self.clock = clock
        self.in_flight_deadline_s = in_flight_deadline_s
        self._budgets: dict[str, list[BudgetSpec]] = {}
        self._deadlines: dict[str, float] = {}
        self._store_specs: dict[str, BudgetStoreSpec] = {}
        self._logged_at: dict[tuple[str, str], float] = {}
        self.store_probe_s = store_probe_s
        self._store_down_until = 0.0
        """``time.monotonic()`` before which reservations do not ask the failed store."""

    # -- configuration -------------------------------------------------------------------

    def update_policy(self, policy: str, budgets: Sequence[BudgetSpec], *,
                      request_timeout_s: float | None = None,
                      store: BudgetStoreSpec | None = None) -> None:
        """Install or replace a policy's budgets (``policy``: ``namespace/name``, or a bare
        name in ``default``) and its request timeout (the concurrency slots' deadline is that
        plus ``DEADLINE_MARGIN_S``); takes effect for the next reservation."""
        self._budgets[policy_id(policy)] = list(budgets)
        if request_timeout_s is None:
            self._deadlines.pop(policy_id(policy), None)
        else:
            self._deadlines[policy_id(policy)] = request_timeout_s + DEADLINE_MARGIN_S
        self._store_specs[policy_id(policy)] = store or BudgetStoreSpec()
        if self.metrics is not None:
            for budget in budgets:
                if budget.usd is not None:
                    self.metrics.window_seconds.labels(*policy_labels(policy), budget.name).set(
                        WINDOW_SECONDS[budget.window])

    def remove_policy(self, policy: str) -> None:
        self._budgets.pop(policy_id(policy), None)
        self._deadlines.pop(policy_id(policy), None)
        self._store_specs.pop(policy_id(policy), None)

    def sizes(self) -> dict[str, int]:
        """Entries of the ledger's tables and of an in-memory store (leak watching)."""
        out = {"budget_policies": len(self._budgets),
               "budget_log_throttles": len(self._logged_at)}
        if isinstance(self.store, InMemoryMeterStore):
            out.update(self.store.sizes())
        return out

    def store_spec(self, policy: str) -> BudgetStoreSpec:
        return self._store_specs.get(policy_id(policy)) or BudgetStoreSpec()

    def slot_deadline_s(self, policy: str) -> float:
        """How long a concurrency slot of ``policy`` is held at most."""
        return self._deadlines.get(policy_id(policy), self.in_flight_deadline_s)

    def budgets_for(self, policy: str, tenant: str) -> list[BudgetSpec]:
        return [b for b in self._budgets.get(policy_id(policy), []) if b.tenant in ("*", tenant)]

    @staticmethod
    def meter_key(policy: str, budget: str, tenant: str, kind: str) -> str:
        """``{namespace/name:tenant}:budget:kind`` (no part can contain ``:``). The braces are a
        Redis Cluster hash tag: every meter one reservation touches (one policy and tenant)
        hashes to the same slot, so the multi-key script runs on a cluster."""
        return f"{{{policy_id(policy)}:{tenant}}}:{budget}:{kind}"

    # -- store calls ---------------------------------------------------------------------

    async def _guarded(self, policy: str, operation: str, call: Awaitable[object]) -> bool:
        """Run one store call within the policy's timeout; False (counted, logged) when it
        failed."""
        spec = self.store_spec(policy)
        try:
            async with asyncio.timeout(spec.timeout_ms / 1000.0):
                await call
        except Exception as exc:  # the store is remote: any failure is the store's
            self._store_failed(policy, operation, spec, exc)
            return False
        return True

    def _store_failed(self, policy: str, operation: str, spec: BudgetStoreSpec,
                      exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.store_errors.labels(*policy_labels(policy), operation,
                                             spec.on_error).inc()
        now = time.monotonic()
        key = (policy_id(policy), operation)
        if now - self._logged_at.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged_at[key] = now
            reason = "timed out" if isinstance(exc, TimeoutError) else repr(exc)
            log.warning("budget store %s for policy %s failed (%s); budgetStore.onError=%s",
                        operation, policy_id(policy), reason, spec.on_error)

    async def _release(self, policy: str, key: str, member: str) -> None:
        """Free an in-flight member, retrying a failing store for ``RELEASE_RETRY_S`` (else
        the member expires at its deadline)."""
        delay, waited = 0.25, 0.0
        while not await self._guarded(policy, "release", self.store.release(key, member)):
            if waited >= RELEASE_RETRY_S:
                return
            await asyncio.sleep(delay)
            waited += delay
            delay = min(4.0, delay * 2)

    # -- reservations --------------------------------------------------------------------

    def _charges(self, policy: str, tenant: str, budgets: Sequence[BudgetSpec],
                 estimate: RequestEstimate, usd: float) -> list[tuple[_Limit, MeterCharge]]:
        charges: list[tuple[_Limit, MeterCharge]] = []
        for budget in budgets:
            for limit in _limits_of(budget, self.replica_share):
                amount = {"usd": usd, "tokens": float(estimate.tokens), "requests": 1.0,
                          "concurrency": 1.0}[limit.kind]
                key = self.meter_key(policy, budget.name, tenant, limit.kind)
                if limit.kind == "concurrency":
                    charge = MeterCharge(key, "inflight", limit.value, 1.0)
                else:
                    charge = MeterCharge(key, "window", limit.value, amount,
                                         window_s=limit.window_s)
                charges.append((limit, charge))
        return charges

    async def reserve(self, policy: str, tenant: str, candidates: Sequence[PoolEconomics],
                      estimate: RequestEstimate) -> BudgetDecision:
        """Reserve ``estimate`` on the first candidate pool (the preferred one); see the module
        docstring for downgrade and refusal."""
        if not candidates:
            raise ValueError("reserve needs at least one candidate pool")
        budgets = self.budgets_for(policy, tenant)
        now = self.clock()
        member = f"{now:.6f}-{next(_MEMBER_COUNTER)}"
        deadline = now + self.slot_deadline_s(policy)
        preferred = candidates[0]
        cheapest_first = sorted(candidates, key=lambda p: p.request_usd(
            estimate.prompt_tokens, estimate.max_output_tokens))
        attempts = [preferred] + [p for p in cheapest_first if p.name != preferred.name]
        first_refusal: tuple[_Limit, float, float] | None = None
        for attempt, pool in enumerate(attempts):
            usd = pool.request_usd(estimate.prompt_tokens, estimate.max_output_tokens)
            charges = self._charges(policy, tenant, budgets, estimate, usd)
            store = self.store_spec(policy)
            if time.monotonic() < self._store_down_until:  # failed a moment ago: don't wait
                return self._unavailable(policy, tenant, budgets, pool.name, store)
            try:
                async with asyncio.timeout(store.timeout_ms / 1000.0):
                    refused = await self.store.try_charge([c for _, c in charges], now, member,
                                                          deadline)
            except Exception as exc:  # the store is remote: any failure is the store's
                self._store_down_until = time.monotonic() + self.store_probe_s
                self._store_failed(policy, "reserve", store, exc)
                return self._unavailable(policy, tenant, budgets, pool.name, store)
            if refused is None:
                reservation = Reservation(
                    policy=policy_id(policy), tenant=tenant, pool=pool.name, member=member,
                    charged_at=now,
                    charges=tuple((limit.budget.name, charge) for limit, charge in charges),
                    estimate=estimate, usd=usd)
                outcome = "downgraded" if attempt > 0 else "admitted"
                self.count_requests(policy, tenant, budgets, outcome)
                if self.metrics is not None:
                    for budget in budgets:
                        self.metrics.in_flight.labels(*policy_labels(policy), budget.name,
                                                      tenant).inc()
                return BudgetDecision(pool=pool.name, reservation=reservation,
                                      downgraded=attempt > 0)
            limit = charges[refused.index][0]
            if first_refusal is None:
                first_refusal = (limit, refused.used, refused.retry_after_s)
            self._count_exhausted(policy, tenant, limit)
            # Only a USD limit of a Downgrade budget can be helped by a cheaper pool.
            if not (limit.kind == "usd" and limit.budget.on_exhausted == "Downgrade"):
                break
            if attempt + 1 < len(attempts) and attempts[attempt + 1].request_usd(
                    estimate.prompt_tokens, estimate.max_output_tokens) >= usd:
                break
        assert first_refusal is not None
        limit, used, retry = first_refusal
        self.count_requests(policy, tenant, budgets, "rejected")
        return BudgetDecision(pool=None, reservation=None,
                              error=self._exhausted_error(limit, tenant, used, retry))

    def _unavailable(self, policy: str, tenant: str, budgets: Sequence[BudgetSpec], pool: str,
                     store: BudgetStoreSpec) -> BudgetDecision:
        if store.on_error == "FailOpen":
            self.count_requests(policy, tenant, budgets, "unmetered")
            return BudgetDecision(pool=pool, reservation=None, unmetered=True)
        self.count_requests(policy, tenant, budgets, "rejected")
        return BudgetDecision(pool=None, reservation=None, error=ApiError(
            status=503, type="server_error", code="budget_store_unavailable",
            message=(f"the budget store did not answer within {store.timeout_ms} ms, and "
                     f"policy {policy_id(policy)} fails closed (RoutePolicy "
                     "spec.budgetStore.onError: FailClosed); retry later"),
            retry_after_s=1.0))

    def _exhausted_error(self, limit: _Limit, tenant: str, used: float,
                         retry_after_s: float) -> ApiError:
        budget = limit.budget
        if limit.kind == "usd":
            what = (f"USD {used:.4f} of {limit.value:.4f} spent in the rolling "
                    f"{budget.window} window")
        elif limit.kind == "concurrency":
            what = f"{int(used)} of {int(limit.value)} requests in flight"
        else:
            unit = "tokens" if limit.kind == "tokens" else "requests"
            what = f"{used:.0f} of {limit.value:.0f} {unit} used in the last minute"
        return ApiError(
            status=429, type="rate_limit_exceeded", code="budget_exhausted",
            param=f"budgets[{budget.name}].{limit.field}",
            message=(f"budget '{budget.name}' ({limit.field}) is exhausted for tenant "
                     f"'{tenant}': {what}; retry after {max(1, math.ceil(retry_after_s))}s"),
            retry_after_s=retry_after_s)

    async def settle(self, reservation: Reservation, pool: PoolEconomics, prompt_tokens: int,
                     output_tokens: int) -> float:
        """Replace the estimate with the real usage and free the concurrency slot; returns the
        USD charged."""
        now = self.clock()
        usd = pool.request_usd(prompt_tokens, output_tokens)
        actual_tokens = prompt_tokens + output_tokens
        try:
            await self._release_slots(reservation)
            for _, charge in reservation.charges:
                if charge.kind == "inflight":
                    continue
                kind = charge.key.rsplit(":", 1)[1]
                delta = {"usd": usd - charge.amount,
                         "tokens": actual_tokens - charge.amount}.get(kind, 0.0)
                if delta:
                    await self._guarded(reservation.policy, "settle", self.store.adjust(
                        charge.key, delta, reservation.charged_at, now, charge.window_s,
                        charge.buckets))
        finally:
            if self.metrics is not None:
                for name in {budget for budget, _ in reservation.charges}:
                    labels = (*policy_labels(reservation.policy), name, reservation.tenant)
                    self.metrics.spend_usd.labels(*labels).inc(usd)
                    self.metrics.tokens.labels(*labels, "prompt").inc(prompt_tokens)
                    self.metrics.tokens.labels(*labels, "output").inc(output_tokens)
                    self.metrics.in_flight.labels(*labels).dec()
        return usd

    async def _release_slots(self, reservation: Reservation) -> None:
        await asyncio.gather(*(self._release(reservation.policy, charge.key, reservation.member)
                               for _, charge in reservation.charges
                               if charge.kind == "inflight"))

    async def cancel(self, reservation: Reservation) -> None:
        """Undo a reservation whose request never reached an engine (the request still counts
        against requests per minute)."""
        now = self.clock()
        try:
            await self._release_slots(reservation)
            for _, charge in reservation.charges:
                if charge.kind != "inflight" and not charge.key.endswith(":requests"):
                    await self._guarded(reservation.policy, "settle", self.store.adjust(
                        charge.key, -charge.amount, reservation.charged_at, now,
                        charge.window_s, charge.buckets))
        finally:
            if self.metrics is not None:
                for name in {budget for budget, _ in reservation.charges}:
                    self.metrics.in_flight.labels(*policy_labels(reservation.policy), name,
                                                  reservation.tenant).dec()

    async def remaining_usd(self, policy: str, tenant: str) -> float | None:
        """The smallest USD headroom of the tenant's budgets (None when none limits USD)."""
        windows, _ = await self._usd_windows(policy, tenant)
        return min((max(0.0, limit - used) for limit, used in windows), default=None)

    async def usd_idle(self, policy: str, tenant: str) -> bool:
        """Whether the tenant has nothing in any USD window (or no USD budget): its gauges,
        refreshed now, stay right until it spends again. False when a store read failed."""
        windows, failed = await self._usd_windows(policy, tenant)
        return not failed and all(used == 0 for _, used in windows)

    async def _usd_windows(self, policy: str, tenant: str
                           ) -> tuple[list[tuple[float, float]], bool]:
        """(limit, used) of each USD window of the tenant, their gauges refreshed; and whether
        a store read failed (that window is left out)."""
        now = self.clock()
        windows: list[tuple[float, float]] = []
        failed = False
        for budget in self.budgets_for(policy, tenant):
            for limit in _limits_of(budget, self.replica_share):
                if limit.kind != "usd":
                    continue
                key = self.meter_key(policy, budget.name, tenant, "usd")
                store = self.store_spec(policy)
                try:
                    async with asyncio.timeout(store.timeout_ms / 1000.0):
                        used = await self.store.used(MeterCharge(
                            key, "window", limit.value, 0.0, window_s=limit.window_s), now)
                except Exception as exc:  # the store is remote: any failure is the store's
                    self._store_failed(policy, "read", store, exc)
                    failed = True
                    continue
                if self.metrics is not None:
                    labels = (*policy_labels(policy), budget.name, tenant)
                    self.metrics.window_spend_usd.labels(*labels).set(used)
                    self.metrics.limit_usd.labels(*labels).set(limit.value)
                windows.append((limit.value, used))
        return windows, failed

    def usd_limit_per_second(self, policy: str, tenant: str) -> float | None:
        """The tightest USD budget as a spend rate (limit / window): the pacing rate the batch
        stage divides among requests."""
        rates = [b.usd * self.replica_share / WINDOW_SECONDS[b.window]
                 for b in self.budgets_for(policy, tenant) if b.usd is not None]
        return min(rates) if rates else None

    # -- metrics -------------------------------------------------------------------------

    def count_requests(self, policy: str, tenant: str, budgets: Sequence[BudgetSpec],
                       outcome: str) -> None:
        """Count one request under each budget: ``admitted``, ``downgraded``, ``rejected``
        (by the ledger), ``unmetered`` (the store failed, the policy fails open) or ``shed``
        (refused before the budget check: admission control under saturation, or no pool with
        capacity)."""
        if self.metrics is None:
            return
        for budget in budgets:
            self.metrics.requests.labels(*policy_labels(policy), budget.name, tenant,
                                         outcome).inc()

    def _count_exhausted(self, policy: str, tenant: str, limit: _Limit) -> None:
        if self.metrics is not None:
            self.metrics.exhausted.labels(*policy_labels(policy), limit.budget.name, tenant,
                                          _METRIC_LIMIT[limit.kind]).inc()
