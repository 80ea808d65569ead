"""The online batch stage: requests of one policy arriving within ``spec.batching.windowMs``
are assigned to pools together (``assignment.solve_batch``) under the window's share of the
tenant's USD budget and each pool's free capacity.

The request path calls one method, ``await batcher.assign(request) -> PoolChoice``. The window
is adaptive: a request is assigned at once, by the per-request rule, when the budget does not
bind (its pacing share pays for the best pool) and every pool has spare capacity — batching
then could not change the answer, so it never delays. Otherwise the request waits for the
window to close (``windowMs`` after its first request, or ``maxBatchSize`` requests, whichever
is first), and the window is solved per tenant, each tenant's group under its own budget share,
deducting capacity as it goes.

Budget share (pacing): the tightest USD limit as a rate (limit / window) divided by the
tenant's recent request rate is what one request may spend on average; a batch of n may spend
n times that, never more than the budget's remaining headroom. The ledger's reservation stays
the hard guard afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from kvroute_api.route_policy import BatchingSpec

from kvroute_router.batching.assignment import (
    Assignment,
    AssignmentProblem,
    PoolCapacity,
    robust_quality,
    solve_batch,
)
from kvroute_router.batching.quality import QualityEstimator
from kvroute_router.budget.ledger import BudgetLedger
from kvroute_router.budget.metrics import BudgetMetrics, policy_labels
from kvroute_router.budget.pricing import PoolEconomics


@dataclass(frozen=True)
class BatchRequest:
    """What the batch stage needs to know about one request."""

    prompt: str
    prompt_tokens: int
    max_output_tokens: int
    tenant: str


@dataclass(frozen=True)
class PoolState:
    """A candidate pool now: its economics and requests in flight on it."""

    economics: PoolEconomics
    in_flight: int = 0


@dataclass(frozen=True)
class PoolChoice:
    """The batch stage's answer: a pool (None: no pool fits the budget and capacity)."""

    pool: str | None
    predicted_quality: float
    estimated_usd: float
    batch_size: int
    solve_seconds: float
    method: str


class RequestRate:
    """Exponentially weighted request rate per key (requests per second)."""

    def __init__(self, half_life_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.half_life_s = half_life_s
        self.clock = clock
        self._state: dict[str, tuple[float, float]] = {}

    def observe(self, key: str) -> None:
        now = self.clock()
        rate, last = self._state.get(key, (0.0, now))
        decay = 0.5 ** ((now - last) / self.half_life_s)
        self._state[key] = (rate * decay + np.log(2) / self.half_life_s, now)

    def rate(self, key: str) -> float:
        now = self.clock()
        rate, last = self._state.get(key, (0.0, now))
        return float(rate * 0.5 ** ((now - last) / self.half_life_s))


@dataclass
class _Window:
    entries: list[tuple[BatchRequest, asyncio.Future[PoolChoice]]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class BatchRouter:
    """One policy's batch stage; see the module docstring. ``policy`` is its
    ``namespace/name`` as the ledger knows it (a bare name is in ``default``)."""

    def __init__(self, policy: str, batching: BatchingSpec, estimator: QualityEstimator,
                 pools: Callable[[], Sequence[PoolState]], ledger: BudgetLedger, *,
                 robust_kappa: float = 0.0, metrics: BudgetMetrics | None = None) -> None:
        self.policy = policy
        self.batching = batching
        self.estimator = estimator
        self.pools = pools
        self.ledger = ledger
        self.robust_kappa = robust_kappa
        self.metrics = metrics
        self.rates = RequestRate()
        self._window = _Window()

    def update_batching(self, batching: BatchingSpec) -> None:
        self.batching = batching

    async def assign(self, request: BatchRequest) -> PoolChoice:
        """Choose a pool for ``request`` (waits at most ``windowMs``)."""
        self.rates.observe(request.tenant)
        pools = list(self.pools())
        if not pools:
            return PoolChoice(None, 0.0, 0.0, 1, 0.0, "no-pools")
        if not self.batching.enabled or self.batching.window_ms == 0 \
                or await self._batching_cannot_help(request, pools):
            return (await self._solve([request], pools))[0]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[PoolChoice] = loop.create_future()
        self._window.entries.append((request, future))
        if len(self._window.entries) >= self.batching.max_batch_size:
            await self._flush()
        elif self._window.timer is None:
            self._window.timer = loop.call_later(self.batching.window_ms / 1000.0,
                                                 lambda: asyncio.ensure_future(self._flush()))
        return await future

    async def _batching_cannot_help(self, request: BatchRequest,
                                    pools: Sequence[PoolState]) -> bool:
        if self._window.entries:
            return False
        waiting = len(self._window.entries) + 1
        for state in pools:
            free = state.economics.free_sequences(state.in_flight)
            if free is not None and free < waiting:
                return False
        share = await self._per_request_share(request.tenant)
        if share is None:
            return True
        dearest = max(state.economics.request_usd(request.prompt_tokens,
                                                  request.max_output_tokens) for state in pools)
        return share >= dearest

    async def _per_request_share(self, tenant: str) -> float | None:
        rate = self.ledger.usd_limit_per_second(self.policy, tenant)
        if rate is None:
            return None
        requests_per_second = max(self.rates.rate(tenant), 1e-9)
        return rate / requests_per_second

    async def _flush(self) -> None:
        window, self._window = self._window, _Window()
        if window.timer is not None:
            window.timer.cancel()
        if not window.entries:
            return
        requests = [request for request, _ in window.entries]
        try:
            choices = await self._solve(requests, list(self.pools()))
        except Exception as error:  # every waiter must hear about it, never hang
            for _, future in window.entries:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), choice in zip(window.entries, choices, strict=True):
            if not future.done():
                future.set_result(choice)

    async def _solve(self, requests: Sequence[BatchRequest],
                     pools: Sequence[PoolState]) -> list[PoolChoice]:
        choices: list[PoolChoice | None] = [None] * len(requests)
        tiers = [state.economics.tier for state in pools]
        # Off the event loop: a MiniLM forward pass takes tens of ms per prompt on a CPU.
        estimate = await asyncio.to_thread(self.estimator.predict,
                                           [r.prompt for r in requests], tiers)
        quality = estimate.mean
        if self.robust_kappa > 0:
            cheapest = int(np.argmin([s.economics.usd_per_output_token for s in pools]))
            quality = robust_quality(estimate.mean, estimate.std, self.robust_kappa, cheapest)
        free = [state.economics.free_sequences(state.in_flight) for state in pools]
        by_tenant: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_tenant.setdefault(request.tenant, []).append(index)
        for tenant, rows in by_tenant.items():
            share = await self._per_request_share(tenant)
            headroom = await self.ledger.remaining_usd(self.policy, tenant)
            budget = None if share is None else len(rows) * share
            if headroom is not None:
                budget = headroom if budget is None else min(budget, headroom)
            cost = np.asarray([[s.economics.request_usd(requests[i].prompt_tokens,
                                                        requests[i].max_output_tokens)
                                for s in pools] for i in rows], dtype=np.float64)
            problem = AssignmentProblem(
                quality=quality[rows], cost=cost, budget_usd=budget,
                capacities=[PoolCapacity(free_sequences=f) for f in free])
            result: Assignment = solve_batch(problem)
            if self.metrics is not None:
                labels = policy_labels(self.policy)
                self.metrics.batch_solve_seconds.labels(*labels).observe(result.solve_seconds)
                self.metrics.batch_size.labels(*labels).observe(len(rows))
            for position, row in enumerate(rows):
                pool = int(result.pools[position])
                if pool < 0:
                    choices[row] = PoolChoice(None, 0.0, 0.0, len(requests),
                                              result.solve_seconds, result.method)
                    continue
                capacity = free[pool]
                if capacity is not None:
                    free[pool] = capacity - 1
                choices[row] = PoolChoice(
                    pools[pool].economics.name, float(estimate.mean[row, pool]),
                    float(cost[position, pool]), len(requests), result.solve_seconds,
                    result.method)
        return [choice for choice in choices if choice is not None]
