"""Admission control from ``RoutePolicy.spec.admission``: token limits (413 for the prompt, 400
for ``max_tokens``, naming the limit), and, when every endpoint is saturated, shedding of
sheddable priority classes (429) and a bounded priority queue with a timeout for the rest.

Saturation is computed from load the caller passes in (queue depth and KV-cache utilisation per
endpoint, from the metrics scraper) by :class:`~kvroute_router.framework.saturation.Saturation`,
the definition the ``load-headroom`` filter uses too: an endpoint is saturated when its waiting
requests reach ``saturationQueueDepth`` or its KV-cache utilisation reaches
``saturationKvUtilization``; the pool is saturated when all its endpoints are. Queued requests are
released, highest priority first, by ``release_waiting()``, which the request path calls when a
request arrives or finishes and when metrics refresh.

*Decision (round 33):* a call releases as many waiters as the endpoints have room for — the
queue places left below ``saturationQueueDepth`` summed over the endpoints below saturation —
less the waiters released earlier that have not resumed yet (their dispatches are not in the
load yet; counted as *in transit*). Releasing one waiter per call, as before, fed the engines
less than they finish once the queue had formed: calls come with arrivals, completions and
metrics refreshes, and one that found every endpoint saturated let nothing go, so each such
completion left the engines one request short for good. Past saturation on 16 emulated engines
it held the engines' queues at half the threshold and cut throughput to 0.4x
(docs/benchmarks/emulated-fleet.md, round 33).

*Decision (round 38):* with router replicas (``replicas``, from replica sync: the replicas heard
from lately), a replica releases its share of that room, ``ceil(room / replicas)``: every
replica judges the room on its own view of the engines, which shows the others' releases only
once their dispatch records arrive, and each let go the whole room. In the simulator (three
replicas as router processes, 1 ms sync, 16 pods past saturation, six seeds) the share cut
TTFT p90 by 4 % and p99 by 6.5 % on average (p99 lower on five seeds, level on the sixth), a
third of the replicas' loss against one router; below saturation nothing changes (the queue
stays empty).

*Decision (round 39):* with the other replicas' queues known (``peers_waiting``, each
replica's waiters' order keys over replica sync), the share goes to the fleet's oldest
waiters: a replica lets go only its own waiters among the first ``ceil(room / replicas)`` of
all the replicas' queues merged by (priority, arrival), and leaves the rest to the replicas that
hold them. Each replica's own first-come-first-served order had let a replica with younger
waiters release them while another's older ones waited. In the simulator (same set-up, six
seeds, 1 ms of sync) TTFT p90 -3.6 % and p99 -6.8 % on average, p99 lower on every seed.
The deference is bounded: a waiter that has waited half the ``queueTimeoutMs`` counts as first
whatever the others report, so forged or stale reports delay a replica's queue, never stop it.

*Decision (round 43):* ``newestFirstAfterMs`` (off by default) is adaptive LIFO for overload:
while the oldest waiter has waited that long, a release lets the newest go first (highest
priority class first still), and marks them so the engines serve them newest-first too
(``LLMRequest.newest_first``). First come first served under sustained overload gives every
request the whole queue's wait, so none meets a TTFT objective; newest-first keeps most of them
short and leaves the oldest to wait until ``queueTimeoutMs``. The engines' side matters as much
as the router's: with the router's queue alone newest-first, the engines' own queues (up to
``saturationQueueDepth`` each, ranked by arrival) still held ~2 s. While it is on, a replica
releases its own newest and does not defer to the fleet's oldest (round 39).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvroute_api.route_policy import AdmissionSpec

from kvroute_router.budget.ledger import ApiError
from kvroute_router.budget.metrics import BudgetMetrics, policy_labels
from kvroute_router.framework.saturation import Saturation

PRIORITY_HEADER = "x-kvroute-priority"

# The ``order`` label values of ``kvroute_admission_released_total``.
RELEASED_IN_ARRIVAL_ORDER = "arrival"
RELEASED_NEWEST_FIRST = "newest_first"

WaitingKey = tuple[int, int]
"""A waiter's place in the fleet's order: (-priority, arrival in Unix ms); smaller goes first."""

_Waiter = tuple[int, int, int, "asyncio.Future[bool]"]
"""A queued request: (-priority, sequence, arrival Unix ms, released newest-first?)."""


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
                 metrics: BudgetMetrics | None = None,
                 replicas: Callable[[], int] | None = None,
                 peers_waiting: Callable[[], Sequence[WaitingKey]] | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.policy = policy
        self.spec = spec
        self.load = load
        self.metrics = metrics
        self.replicas = replicas
        """The router replicas sharing the engines, this one included (replica sync's
        :meth:`~kvroute_router.replicasync.sync.ReplicaSync.replicas`); None: one."""
        self.peers_waiting = peers_waiting
        """The other replicas' waiters for this policy (their order keys, any order), as
        replica sync last heard them; None: none known."""
        self.on_change = on_change
        """Called when this queue's waiters change (replica sync reports them)."""
        self._waiting: list[_Waiter] = []
        """The waiters' heap: (-priority, sequence, arrival Unix ms, future); a future's
        result says whether it was released newest-first."""
        self._sequence = itertools.count()
        self._in_transit = 0
        """Waiters released that have not resumed yet: their requests are not in the load."""
        if metrics is not None:  # both orders exported from the start: rate() sees the first
            for order in (RELEASED_IN_ARRIVAL_ORDER, RELEASED_NEWEST_FIRST):
                metrics.admission_released.labels(*policy_labels(policy), order)

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
        """Every endpoint saturated (False with none), counting the waiters in transit as
        taking room. ``load`` may compute lazily: the walk stops as soon as there is room."""
        return self.room(self._in_transit + 1) <= self._in_transit

    def room(self, enough: int) -> int:
        """Queue places left below ``saturationQueueDepth`` over the endpoints that are not
        saturated (at least one each), counted up to ``enough``: the walk stops there, and
        with no endpoints at all (nothing to protect) there is ``enough``."""
        saturation = Saturation.of(self.spec)
        room = 0
        seen = False
        for load in self.load():
            seen = True
            if not saturation.saturated(load.waiting, load.kv_utilization):
                room += max(1, math.ceil(saturation.queue_depth - load.waiting))
                if room >= enough:
                    return room
        return room if seen else enough

    def release_room(self, enough: int) -> int:
        """How many queued requests this replica may have let go, up to ``enough``: its share
        of the :meth:`room`, ``ceil(room / replicas)`` (the whole room with one replica)."""
        replicas = max(1, self.replicas()) if self.replicas is not None else 1
        return min(enough, math.ceil(self.room(replicas * enough) / replicas))

    async def admit(self, priority: Priority, *,
                    on_newest_first: Callable[[], None] | None = None) -> ApiError | None:
        """None when the request may go on (at once or after queueing); a 429 otherwise.
        ``on_newest_first`` is called when the queue let it go newest-first
        (``newestFirstAfterMs``): the caller tells the engines."""
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
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = (-priority.value, next(self._sequence), int(time.time() * 1000), future)
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
            self._resumed()  # released as the timeout fired: it goes on
        except BaseException:
            # The client went away (or the router is stopping) while queued: leave the queue at
            # once, and hand a slot this waiter was just given to the next live one.
            self._leave(entry)
            if self.metrics is not None:
                self.metrics.admission_rejected.labels(*policy_labels(self.policy),
                                                       "cancelled").inc()
            raise
        else:
            self._resumed()
        if future.result() and on_newest_first is not None:  # released, newest-first
            on_newest_first()
        return None

    def _resumed(self) -> None:
        """A released waiter is out of transit: it resumed, and its request is about to be
        routed and counted in the load (with no ``await`` in between unless a budget must be
        reserved first), or it left."""
        self._in_transit = max(0, self._in_transit - 1)

    def _leave(self, entry: _Waiter) -> None:
        """Take a waiter out of the queue; when it had already been released, release the next
        one in its place (a slot must never go to a waiter that is gone)."""
        future = entry[3]
        released = future.done() and not future.cancelled()
        if released:
            self._resumed()
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
        """Let queued requests go, highest priority first, as many as the endpoints have room
        for beyond the waiters still in transit (see the module docstring); returns how many
        were released."""
        if not self._waiting:
            return 0
        newest_first = self.newest_first_now()
        free = self.release_count(len(self._waiting), self.waiting_keys, self._in_transit,
                                  newest_first=newest_first)
        released = 0
        if newest_first:
            # The first ``free`` by (priority, newest): O(queue) a call while the queue is late.
            going = heapq.nsmallest(free, self._waiting, key=lambda entry: (entry[0], -entry[1]))
            gone: set[int] = set()
            for _, sequence, _, future in going:
                gone.add(sequence)
                if not future.done():
                    future.set_result(True)
                    released += 1
                    self._in_transit += 1
                    self._count_release(RELEASED_NEWEST_FIRST)
            self._waiting = [entry for entry in self._waiting if entry[1] not in gone]
            heapq.heapify(self._waiting)
        while self._waiting and released < free:
            _, _, _, future = heapq.heappop(self._waiting)
            if not future.done():  # a cancelled waiter's future is done: skipped
                future.set_result(False)
                released += 1
                self._in_transit += 1
                self._count_release(RELEASED_IN_ARRIVAL_ORDER)
        self._set_depth()
        return released

    def newest_first_now(self, now_ms: float | None = None) -> bool:
        """Whether a release now goes newest-first: ``newestFirstAfterMs`` is set and the
        oldest waiter has waited at least that long."""
        after = self.spec.newest_first_after_ms
        if after is None or not self._waiting:
            return False
        now = time.time() * 1000 if now_ms is None else now_ms
        return now - min(entry[2] for entry in self._waiting) >= after

    def release_count(self, queued: int, mine: Callable[[int], Sequence[WaitingKey]],
                      in_transit: int = 0, now_ms: float | None = None,
                      newest_first: bool = False) -> int:
        """How many of this replica's ``queued`` waiters to let go now: its share of the room
        (:meth:`release_room`, counted over every replica's waiters) less ``in_transit``; with
        the other replicas' waiters known (``peers_waiting``), only as many as it holds among
        the fleet's first that many by (priority, arrival) or that have waited half the
        ``queueTimeoutMs`` (the deference is bounded), unless the queue goes ``newest_first``.
        ``mine(n)``: this replica's first ``n`` waiters' keys in the order they go."""
        peers = self.peers_waiting() if self.peers_waiting is not None else ()
        free = min(queued, self.release_room(in_transit + queued + len(peers)) - in_transit)
        if free <= 0 or not peers or newest_first:
            return max(0, free)
        first = mine(free)
        cut = heapq.nsmallest(free, itertools.chain(first, peers))[-1]
        now = time.time() * 1000 if now_ms is None else now_ms
        overdue = now - self.spec.queue_timeout_ms / 2
        return sum(1 for key in first if key <= cut or key[1] <= overdue)

    def waiting_keys(self, limit: int) -> list[WaitingKey]:
        """This queue's first ``limit`` waiters' order keys, in the order they go."""
        return [(entry[0], entry[2]) for entry in heapq.nsmallest(limit, self._waiting)]

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def _set_depth(self) -> None:
        if self.on_change is not None:
            self.on_change()
        if self.metrics is not None:
            self.metrics.queue_depth.labels(*policy_labels(self.policy)).set(
                len(self._waiting))

    def _count_release(self, order: str) -> None:
        if self.metrics is not None:
            self.metrics.admission_released.labels(*policy_labels(self.policy), order).inc()

    def _reject(self, reason: str, error: ApiError) -> ApiError:
        if self.metrics is not None:
            self.metrics.admission_rejected.labels(*policy_labels(self.policy), reason).inc()
        return error
