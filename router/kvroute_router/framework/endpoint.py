"""What the scheduler knows about one engine: its address and pool, the latest metrics snapshot
(with its age, for staleness) and the requests this router has in flight to it.

The datastore owns :class:`Endpoint` objects and mutates them (the scraper replaces
``metrics`` atomically, the director counts in-flight requests); plugins only read them.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from kvroute_router.framework.cycle_state import CycleState


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """One scrape of an engine's ``/metrics``, summed over its data-parallel ranks."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    block_size: int | None = None
    hash_algo: str | None = None
    num_gpu_blocks: int | None = None
    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    max_loras: int | None = None
    scraped_at: float = 0.0
    """``time.monotonic()`` when the scrape finished."""


@dataclass(eq=False, slots=True)
class PrefillInFlight:
    """A prompt prefix one attempt of this router is making an endpoint compute, from the first
    block the endpoint did not hold at dispatch (``Endpoint.prefill_in_flight``)."""

    priority: int | None = None
    """The vLLM ``priority`` the attempt carries (None: the engines run FCFS). A request that
    reuses the prefix is ranked after it (:meth:`Endpoint.prefill_priority_floor`)."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the attempt starts answering (its prompt is computed) or ends."""


MAX_UNSEEN = 4096
"""At most this many dispatches in :attr:`Endpoint.unseen`: another replica's dispatches (replica
sync) leave it only at a page, so an engine whose scrapes keep failing would keep every one."""


@dataclass(eq=False, slots=True)
class Endpoint:
    """One engine of a pool, as the router sees it right now."""

    name: str
    address: str
    pool: str
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    metrics: EndpointMetrics | None = None
    in_flight: int = 0
    """Requests this router dispatched to the endpoint that have not finished."""
    unseen: dict[int, None] = field(default_factory=dict)
    """The dispatches the latest metrics snapshot does not show (sent after it) that have not
    answered, by number (:meth:`dispatched`), oldest first: a request whose first byte came has
    left the engine's waiting queue, so it no longer counts toward :meth:`waiting_estimate`
    (:meth:`answered`)."""
    left_since_snapshot: int = 0
    """This router's requests the latest snapshot may show that have started answering or
    ended since it was read: no longer waiting, whatever it says (:meth:`answered`), so
    :meth:`waiting_estimate` takes them off its waiting count."""
    dispatches: int = 0
    """Dispatches to the endpoint since start-up, by this router or (replica sync) another one:
    the scraper's count of those a page it asked for may show (``MetricsScraper.foreign_load``)."""
    prefill_backlog: float = 0.0
    """Prompt tokens this router sent the endpoint that it has not computed yet: per attempt in
    flight, the part of its prompt the endpoint did not hold when it was dispatched
    (:meth:`LLMRequest.prefill_tokens`), until the first byte of its answer (the prompt is
    computed then) or the attempt's end. What the ``prefill-cost`` scorer adds up."""
    prefill_backlog_newest_first: float = 0.0
    """The part of :attr:`prefill_backlog` from attempts the admission queue let go
    newest-first to a priority engine (``LLMRequest.newest_first``): ranked there ahead of
    every arrival-ranked request, this is the backlog another newest-first request waits
    behind (:meth:`prefill_backlog_ahead`)."""
    prefill_in_flight: dict[int, PrefillInFlight] = field(default_factory=dict)
    """Prompt prefixes this endpoint is computing for requests this router sent it: the hash
    of the first block each will compute (the first it did not hold at dispatch) -> its
    :class:`PrefillInFlight`, until that request starts answering or its attempt ends. A later
    request that matched those blocks as pending waits for it (``scoring.prefillWaitMs``)
    instead of computing them a second time beside it, and on priority engines is ranked
    after it (:meth:`prefill_priority_floor`)."""
    answers_started: int = 0
    """Attempts on this endpoint whose answer started (its first byte reached this router or,
    with replica sync, another replica), counted since start-up: an endpoint whose count moves
    is making progress, so an attempt that waits there for its first byte is queued behind
    others, not stuck (the proxy's per-try timeout)."""
    scrape_failures: int = 0
    """Consecutive failed scrapes (0 after a success)."""
    unavailable_until: float = 0.0
    """``time.monotonic()`` until which the proxy saw the endpoint refuse connections."""
    labels: dict[str, str] = field(default_factory=dict)
    idle_scrape_wake: asyncio.Event | None = None
    """Set by the scraper while it scrapes the endpoint at its slower idle period (its last
    snapshots, 10 in a row, showed nothing running or waiting and nothing was in flight to it):
    a dispatch (:meth:`dispatched`) sets the event, and the scrape loop goes back to its normal
    period."""

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def add_prefill_backlog(self, tokens: float, newest_first: bool = False) -> None:
        """An attempt sent here must compute ``tokens`` of its prompt (``newest_first``: it
        was let go newest-first to a priority engine)."""
        self.prefill_backlog += tokens
        if newest_first:
            self.prefill_backlog_newest_first += tokens

    def remove_prefill_backlog(self, tokens: float, newest_first: bool = False) -> None:
        """Undo :meth:`add_prefill_backlog` (the attempt started answering or ended)."""
        self.prefill_backlog = max(0.0, self.prefill_backlog - tokens)
        if newest_first:
            self.prefill_backlog_newest_first = max(
                0.0, self.prefill_backlog_newest_first - tokens)

    def prefill_backlog_ahead(self, newest_first: bool) -> float:
        """The prompt tokens a request sent here now waits behind: the whole backlog, or for a
        request let go newest-first to a priority engine only the newest-first part (it
        overtakes every arrival-ranked request queued there)."""
        return self.prefill_backlog_newest_first if newest_first else self.prefill_backlog

    @property
    def kv_capacity_blocks(self) -> int | None:
        """The engine's KV-cache size in blocks (``num_gpu_blocks``) from its last scrape, of
        any age (it changes only with a restart); None before one shows it. What the prefix
        index forecasts a dispatch's evictions against."""
        return None if self.metrics is None else self.metrics.num_gpu_blocks

    def prefills_reused(self, held: Iterable[int]) -> list[PrefillInFlight]:
        """This router's attempts computing, on this endpoint, a prefix that starts at one of
        the blocks ``held`` (a prompt's leading blocks the endpoint holds, published or
        pending): what a request reusing those blocks waits for, and is ranked after."""
        computing = self.prefill_in_flight
        if not computing:
            return []
        # A few attempts in flight against a prefix of hundreds of blocks: intersect in C.
        return [computing[block] for block in computing.keys() & held]

    def prefill_priority_floor(self, held: Iterable[int]) -> int | None:
        """The highest vLLM priority among :meth:`prefills_reused` (None: there is none). A
        request reusing their prefix ranked ahead of the attempt computing it would compute
        the blocks itself first, beside it: the pending blocks are not cached yet."""
        floors = [flight.priority for flight in self.prefills_reused(held)
                  if flight.priority is not None]
        return max(floors) if floors else None

    @property
    def dispatched_since_scrape(self) -> int:
        """Dispatches after the latest snapshot that have not answered (:attr:`unseen`)."""
        return len(self.unseen)

    def dispatched(self) -> int:
        """A request was sent to the endpoint, by this router or (replica sync) another one:
        not in its snapshot until the next scrape, which comes at the normal period now. Its
        number (:attr:`dispatches`), for :meth:`answered`."""
        self.dispatches += 1
        unseen = self.unseen
        unseen[self.dispatches] = None
        if len(unseen) > MAX_UNSEEN:  # an engine not scraped for long: forget the oldest
            del unseen[next(iter(unseen))]
        if self.idle_scrape_wake is not None:
            self.idle_scrape_wake.set()
        return self.dispatches

    def answered(self, number: int) -> None:
        """This router's dispatch ``number`` started answering or ended before it did: it is
        not waiting. Sent after the latest snapshot, it leaves :attr:`unseen`; otherwise the
        snapshot may count it as waiting, and :attr:`left_since_snapshot` takes it off. (One
        count for both, as before round 52, took a request the page showed running off the
        dispatches it does not show.)"""
        if number in self.unseen:
            del self.unseen[number]
        else:
            self.left_since_snapshot += 1

    def took_snapshot(self, metrics: EndpointMetrics) -> None:
        """``metrics`` (a page the scraper just read) is the endpoint's snapshot now.

        The page shows this router's dispatches that reached the engine's scheduler before it
        was written; one sent while the page was on its way (or still being read by the
        engine's HTTP server) is not on it. So only dispatches the page *can* account for are
        forgotten: what stays counted is this router's in-flight requests beyond what the page
        shows running or waiting, and never more than was counted before. (Resetting to 0, as
        before, dropped 9 % of the dispatches followed by a scrape on the emulated fleet,
        router-cpu.md round 22.) Another replica's dispatches (replica sync) are not in
        ``in_flight``; they are forgotten as before. The ones forgotten are the oldest: the
        newest are the likeliest to have missed the page."""
        self.metrics = metrics
        self.left_since_snapshot = 0
        shown = self.in_flight - int(metrics.running + metrics.waiting)
        self.forget_unseen(len(self.unseen) - max(0, shown))

    def forget_unseen(self, count: int) -> None:
        """Forget the ``count`` oldest of :attr:`unseen` (all of them, or none for ``count``
        <= 0)."""
        unseen = self.unseen
        if count >= len(unseen):
            unseen.clear()
        else:
            for number in list(itertools.islice(unseen, max(0, count))):
                del unseen[number]

    def metrics_age(self, now: float | None = None) -> float:
        """Seconds since the last successful scrape (infinite when never scraped)."""
        if self.metrics is None:
            return float("inf")
        return (time.monotonic() if now is None else now) - self.metrics.scraped_at

    def metrics_stale(self, stale_after_s: float, now: float | None = None) -> bool:
        return self.metrics_age(now) > stale_after_s

    def healthy(self, now: float | None = None, max_scrape_failures: int = 3) -> bool:
        """Not known to be down: fewer than ``max_scrape_failures`` failed scrapes in a row and
        no recent connection failure seen by the proxy. Never-scraped endpoints count as
        healthy, so a fresh router serves before its first scrape completes."""
        if self.scrape_failures >= max_scrape_failures:
            return False
        return (time.monotonic() if now is None else now) >= self.unavailable_until

    # The load estimates below are the one definition of an endpoint's load that every
    # load-aware plugin (load-headroom, queue-depth, running-requests) and admission use.
    # ``stale_after_s``/``now`` make them staleness-aware: a snapshot older than that is not
    # read, and ``stale_value`` (the plugins pass 0, or the fresh candidates' average) stands
    # in for its number; the router's own counts always apply. Without ``now`` the snapshot is
    # used whatever its age.

    def fresh_metrics(self, stale_after_s: float = math.inf, now: float | None = None
                      ) -> EndpointMetrics | None:
        """The latest snapshot if it is at most ``stale_after_s`` old at ``now`` (any age
        without ``now``), else None."""
        m = self.metrics
        if m is None or (now is not None and now - m.scraped_at > stale_after_s):
            return None
        return m

    def running_estimate(self, stale_after_s: float = math.inf, now: float | None = None,
                         stale_value: float = 0.0) -> float:
        """Running requests: the engine's number, or this router's own in-flight count when
        that is larger (fresh dispatches are not in the snapshot yet)."""
        m = self.fresh_metrics(stale_after_s, now)
        scraped = stale_value if m is None else m.running
        in_flight = float(self.in_flight)
        return in_flight if in_flight > scraped else scraped  # max(scraped, in_flight)

    def waiting_estimate(self, stale_after_s: float = math.inf, now: float | None = None,
                         stale_value: float = 0.0) -> float:
        """Waiting requests, counting dispatches after the snapshot that have not answered yet
        as waiting."""
        m = self.fresh_metrics(stale_after_s, now)
        scraped = stale_value if m is None else max(0.0, m.waiting - self.left_since_snapshot)
        return scraped + float(len(self.unseen))

    def kv_usage_estimate(self, stale_after_s: float = math.inf, now: float | None = None,
                          stale_value: float = 0.0) -> float:
        """KV-cache utilisation (0-1) of the snapshot; ``stale_value`` when stale or missing."""
        m = self.fresh_metrics(stale_after_s, now)
        return stale_value if m is None else m.kv_cache_usage


STATE_HEALTH_PANIC = "health_panic"
"""CycleState key: ``True`` when the cycle routes under the *panic rule* (:func:`serving`)."""


def serving(endpoints: Sequence[Endpoint], now: float | None = None,
            max_scrape_failures: int = 3, panic: bool = False) -> list[Endpoint]:
    """The endpoints to route among: the healthy ones (:meth:`Endpoint.healthy`); with
    ``panic``, when none is, those that failed only their scrapes: not those that refused a
    connection (``unavailable_until``, set by the proxy and by the scraper).

    A metrics page that times out on every engine at once (API servers busy, a starved node) is
    weak evidence that the fleet cannot serve, and dropping them all answers every request 503
    while the engines work. The director asks for the panic rule only after every pool of the
    policy, fallbacks included, had nothing healthy (:func:`panic_possible`), as Envoy spills
    to lower priorities before it panics."""
    moment = time.monotonic() if now is None else now
    reachable = [ep for ep in endpoints if moment >= ep.unavailable_until]
    healthy = [ep for ep in reachable if ep.scrape_failures < max_scrape_failures]
    return reachable if panic and not healthy else healthy


def panic_possible(endpoints: Iterable[Endpoint], now: float | None = None,
                   max_scrape_failures: int = 3) -> bool:
    """Whether the panic rule would keep an endpoint of ``endpoints`` that is not healthy."""
    moment = time.monotonic() if now is None else now
    return any(moment >= ep.unavailable_until and ep.scrape_failures >= max_scrape_failures
               for ep in endpoints)


@dataclass(frozen=True, slots=True)
class LoadEstimates:
    """The load estimates of :class:`Endpoint` for a whole candidate list at once, as arrays
    (one entry per endpoint, in order), for plugins that look at every endpoint of a pool per
    request. Entry *i* of ``waiting(v)``, ``running(v)`` and ``kv_usage(v)`` equals
    ``endpoints[i].waiting_estimate(stale_after_s, now, v)`` (resp. ``running_estimate``,
    ``kv_usage_estimate``): the same definition, computed in one pass
    (``tests/unit/router/test_plugins_load_estimates.py`` checks the equality).

    :meth:`for_cycle` computes them once per candidate list and scheduling cycle and keeps
    them in the :class:`CycleState`, so the ``load-headroom`` filter and the load scorers share
    one pass over the endpoints."""

    endpoints: Sequence[Endpoint]
    fresh: npt.NDArray[np.bool_]
    """Whether the snapshot is at most ``stale_after_s`` old (False without one)."""
    scraped_waiting: npt.NDArray[np.float64]
    scraped_running: npt.NDArray[np.float64]
    scraped_kv_usage: npt.NDArray[np.float64]
    """The snapshot's numbers (0 where not fresh)."""
    dispatched_since_scrape: npt.NDArray[np.float64]
    in_flight: npt.NDArray[np.float64]
    stale_after_s: float
    now: float

    @classmethod
    def of(cls, endpoints: Sequence[Endpoint], stale_after_s: float,
           now: float) -> LoadEstimates:
        # One comprehension per column and no call per endpoint: this runs over the pool.
        ms = [ep.metrics or _NO_METRICS for ep in endpoints]
        f64 = np.float64
        fresh = ~(now - np.array([m.scraped_at for m in ms], dtype=f64) > stale_after_s)
        all_fresh = bool(fresh.all())

        def column(values: list[float]) -> npt.NDArray[np.float64]:
            array = np.array(values, dtype=f64)
            return array if all_fresh else np.where(fresh, array, 0.0)

        return cls(endpoints=endpoints, fresh=fresh,
                   scraped_waiting=column([max(0.0, m.waiting - ep.left_since_snapshot)
                                           for m, ep in zip(ms, endpoints, strict=True)]),
                   scraped_running=column([m.running for m in ms]),
                   scraped_kv_usage=column([m.kv_cache_usage for m in ms]),
                   dispatched_since_scrape=np.array(
                       [len(ep.unseen) for ep in endpoints], dtype=f64),
                   in_flight=np.array([ep.in_flight for ep in endpoints], dtype=f64),
                   stale_after_s=stale_after_s, now=now)

    @classmethod
    def for_cycle(cls, state: CycleState, endpoints: Sequence[Endpoint],
                  stale_after_s: float, now: float) -> LoadEstimates:
        """The estimates of ``endpoints`` (this very list) for this cycle: computed on first
        use, then shared by every plugin that asks for the same list and staleness limit
        (the first caller's ``now`` holds for the cycle)."""
        cached = state.read(STATE_LOAD_ESTIMATES, list)
        if cached:
            for entry in cached:
                if entry.endpoints is endpoints and entry.stale_after_s == stale_after_s:
                    return entry  # type: ignore[no-any-return]
        estimates = cls.of(endpoints, stale_after_s, now)
        if cached is None:
            state.write(STATE_LOAD_ESTIMATES, [estimates])
        else:
            cached.append(estimates)
        return estimates

    def subset(self, keep: npt.NDArray[np.bool_], endpoints: Sequence[Endpoint],
               state: CycleState | None = None) -> LoadEstimates:
        """The estimates of the endpoints where ``keep`` is True, which must be ``endpoints``
        (a filter's result); remembered in ``state`` for the plugins after the filter."""
        sub = LoadEstimates(
            endpoints=endpoints, fresh=self.fresh[keep],
            scraped_waiting=self.scraped_waiting[keep],
            scraped_running=self.scraped_running[keep],
            scraped_kv_usage=self.scraped_kv_usage[keep],
            dispatched_since_scrape=self.dispatched_since_scrape[keep],
            in_flight=self.in_flight[keep], stale_after_s=self.stale_after_s, now=self.now)
        if state is not None:
            cached = state.read(STATE_LOAD_ESTIMATES, list)
            if cached is None:
                state.write(STATE_LOAD_ESTIMATES, [sub])
            else:
                cached.append(sub)
        return sub

    def fresh_average(self, column: npt.NDArray[np.float64]) -> float:
        """Average of ``column`` over the fresh entries (0 when none is), summed in order."""
        total = 0.0
        count = 0
        for value, fresh in zip(column.tolist(), self.fresh.tolist(), strict=True):
            if fresh:
                total += value
                count += 1
        return total / count if count else 0.0

    def _scraped(self, column: npt.NDArray[np.float64],
                 stale_value: float | None) -> npt.NDArray[np.float64]:
        if bool(self.fresh.all()):
            return column
        if stale_value is None:  # the fresh candidates' average
            stale_value = self.fresh_average(column)
        return np.where(self.fresh, column, stale_value)

    def waiting(self, stale_value: float | None = 0.0) -> npt.NDArray[np.float64]:
        """``Endpoint.waiting_estimate`` per endpoint; ``stale_value=None``: the fresh
        endpoints' average stands in for a stale snapshot."""
        return self._scraped(self.scraped_waiting, stale_value) + self.dispatched_since_scrape

    def running(self, stale_value: float | None = 0.0) -> npt.NDArray[np.float64]:
        """``Endpoint.running_estimate`` per endpoint (see :meth:`waiting`)."""
        scraped = self._scraped(self.scraped_running, stale_value)
        return np.where(self.in_flight > scraped, self.in_flight, scraped)

    def kv_usage(self, stale_value: float | None = 0.0) -> npt.NDArray[np.float64]:
        """``Endpoint.kv_usage_estimate`` per endpoint (see :meth:`waiting`)."""
        return self._scraped(self.scraped_kv_usage, stale_value)


STATE_LOAD_ESTIMATES = "load/estimates"
"""CycleState key: the cycle's :class:`LoadEstimates` (list, one per candidate list)."""


_NO_METRICS = EndpointMetrics(scraped_at=-math.inf)
"""Stands in for a missing snapshot in :meth:`LoadEstimates.of` (always stale)."""
