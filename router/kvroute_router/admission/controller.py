"""Admission control from ``RoutePolicy.spec.admission``: token limits (413 for the prompt, 400
for ``max_tokens``, naming the limit), and, when every endpoint is saturated, shedding of
sheddable priority classes (429) and a bounded priority queue with a timeout for the rest.

Saturation is computed from load the caller passes in (queue depth and KV-cache utilisation per
endpoint, from the metrics scraper) by :class:`~kvroute_router.framework.saturation.Saturation`,
the definition the ``load-headroom`` filter uses too: an endpoint is saturated when its waiting
requests reach ``saturationQueueDepth`` or its KV-cache utilisation reaches
``saturationKvUtilization``; the pool is saturated when all its endpoints are. Queued requests are
released, highest priority first, by
``release_waiting()``, which the request path calls when a request finishes or metrics refresh.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from kvroute_api.route_policy import AdmissionSpec

from kvroute_router.budget.ledger import ApiError
from kvroute_router.budget.metrics import BudgetMetrics, policy_labels
from kvroute_router.framework.saturation import Saturation

PRIORITY_HEADER = "x-kvroute-priority"


@dataclass(frozen=True)
class EndpointLoad:
    """Load of one endpoint, from its metrics."""

    waiting: int
    kv_utilization: float


@dataclass(frozen=True)
class Priority:
    """A request's priority class."""

    name: str
    value: int
    sheddable: bool


class AdmissionController:
    """One policy's admission control; see the module docstring. ``policy`` is its
    ``namespace/name`` (a bare name is in ``default``), the metric labels' source."""

    def __init__(self, policy: str, spec: AdmissionSpec,
                 load: Callable[[], Iterable[EndpointLoad]], *,
                 metrics: BudgetMetrics | None = None) -> None:
        self.policy = policy
        self.spec = spec
        self.load = load
        self.metrics = metrics
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._sequence = itertools.count()

    def update_spec(self, spec: AdmissionSpec) -> None:
        self.spec = spec
        self.release_waiting()

    def priority_of(self, headers: Mapping[str, str]) -> Priority:
        """The class named by x-kvroute-priority, else the default class, else priority 0 and
        not sheddable. Unknown names get the default."""
        classes = {c.name: c for c in self.spec.priority_classes}
        chosen = classes.get(headers.get(PRIORITY_HEADER, "").strip())
        if chosen is None and self.spec.default_priority_class is not None:
            chosen = classes.get(self.spec.default_priority_class)
        if chosen is None:
            return Priority("default", 0, False)
        return Priority(chosen.name, chosen.priority, chosen.sheddable)

    def saturated(self) -> bool:
        """Every endpoint saturated (False with none). ``load`` may compute lazily: the walk
        stops at the first endpoint with room, usually the first one."""
        saturation = Saturation.of(self.spec)
        seen = False
        for load in self.load():
            if not saturation.saturated(load.waiting, load.kv_utilization):
                return False
            seen = True
        return seen

    async def admit(self, priority: Priority) -> ApiError | None:
        """None when the request may go on (at once or after queueing); a 429 otherwise."""
        if not self.saturated() and not self._waiting:
            return None
        if priority.sheddable:
            if self.metrics is not None:
                self.metrics.admission_shed.labels(*policy_labels(self.policy),
                                                   priority.name).inc()
            return ApiError(status=429, type="rate_limit_exceeded", code="overloaded",
                            message=f"every endpoint is saturated; priority class "
                                    f"'{priority.name}' is sheddable", retry_after_s=1.0)
        if len(self._waiting) >= self.spec.max_queue_depth:
            return self._reject("queue_full", ApiError(
                status=429, type="rate_limit_exceeded", code="queue_full",
                message=f"admission queue is full ({self.spec.max_queue_depth} waiting; "
                        "RoutePolicy spec.admission.maxQueueDepth)", retry_after_s=1.0))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (-priority.value, next(self._sequence), future)
        heapq.heappush(self._waiting, entry)
        self._set_depth()
        self.release_waiting()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that arrives together with the release, and a gone client would be admitted.
            async with asyncio.timeout(self.spec.queue_timeout_ms / 1000.0):
                await asyncio.shield(future)
        except TimeoutError:
            if not future.done():
                self._leave(entry)
                return self._reject("queue_timeout", ApiError(
                    status=429, type="rate_limit_exceeded", code="queue_timeout",
                    message=f"waited {self.spec.queue_timeout_ms} ms for a free endpoint "
                            "(RoutePolicy spec.admission.queueTimeoutMs)", retry_after_s=1.0))
        except BaseException:
            # The client went away (or the router is stopping) while queued: leave the queue at
            # once, and hand a slot this waiter was just given to the next live one.
            self._leave(entry)
            if self.metrics is not None:
                self.metrics.admission_rejected.labels(*policy_labels(self.policy),
                                                       "cancelled").inc()
            raise
        return None

    def _leave(self, entry: tuple[int, int, asyncio.Future[None]]) -> None:
        """Take a waiter out of the queue; when it had already been released, release the next
        one in its place (a slot must never go to a waiter that is gone)."""
        future = entry[2]
        released = future.done() and not future.cancelled()
        if not future.done():
            future.cancel()
        try:
            self._waiting.remove(entry)
        except ValueError:
            pass
        else:
            heapq.heapify(self._waiting)
        self._set_depth()
        if released:
            self.release_waiting()

    def release_waiting(self) -> int:
        """Let queued requests go, highest priority first, while endpoints are not saturated;
        returns how many were released."""
        released = 0
        while self._waiting and not self.saturated():
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():  # a cancelled waiter's future is done: skipped
                future.set_result(None)
                released += 1
                # One at a time: the caller's load snapshot changes as requests start.
                break
        self._set_depth()
        return released

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(*policy_labels(self.policy)).set(
                len(self._waiting))

    def _reject(self, reason: str, error: ApiError) -> ApiError:
        if self.metrics is not None:
            self.metrics.admission_rejected.labels(*policy_labels(self.policy), reason).inc()
        return error
