"""Scrapes every endpoint's ``/metrics``, one asyncio task per endpoint over one kept-alive
connection (:mod:`kvroute_router.scrape.connection`), and swaps the parsed snapshot into the
:class:`Endpoint`. How often depends on what the pages show (:func:`scrape_periods`): every
100 ms by default while an engine's pages show requests this router did not send, about twice
per dispatch to it (every 100 ms to 1 s) while they show only its own, every 2 s while it is
idle (below).

A failed or timed-out scrape counts toward ``scrape_failures`` (the healthy filter drops an
endpoint after 3 in a row); the old snapshot stays and ages, so scorers see it as stale after
the policy's ``staleMetricsMs`` and fall back to averages. A page the parser rejects (a
non-numeric or non-finite value, undecodable text) is not an unreachable engine: it does not
count toward ``scrape_failures``, but the endpoint's snapshot is dropped (its metrics are stale
until a good page). Every failure counts in ``kvroute_scrape_errors_total`` by reason, and no
error ends an endpoint's scrape loop. Scrape tasks follow the datastore: they start when
endpoints appear and stop when they leave.

Each loop scrapes at once, then keeps its own *phase* within the interval: the k-th loop
started is offset by ``frac(k * 0.618...) * interval`` (a low-discrepancy sequence, even for any
number of endpoints). Loops started together (a pool's endpoints on load) would otherwise
scrape in lock-step for as long as they run: at ~0.3 ms of router CPU per page, 64 pages
answered together are ~20 ms of parsing back to back every interval, which a request arriving
meanwhile waits out (docs/benchmarks/router-cpu.md, round 9). Rounding the phases to four slots
of the interval, so that a slot's loops share one wake-up, was measured in round 24: ~12 % less
router CPU per request at 64 engines with thin traffic, TTFT level, but 0.2-0.7 ms more added
latency at p50 in 3 of 4 ceiling pairs (likely: a router woken less often is more often asleep
when a request arrives; round 25 saw the same with a 1 s period at 10 req/s). Not kept.

**Only the series the router reads.** vLLM serves its page at ``/metrics/`` too (a mounted
``prometheus_client`` app), where ``name[]`` query parameters restrict it to those samples:
~2 KB instead of ~54 KB, and ~0.7 instead of ~7.5 ms of the engine's API-server CPU per GET
(vLLM-CPU 0.32, measured; that process also serves the engine's requests), ~10x less for the
router to receive and scan. The scraper asks for :data:`FILTERED_PATH` first. An engine that
does not answer it with a page carrying ``vllm:num_requests_running`` (a 404, a redirect, an
older server, a proxy that drops the query) while its plain ``/metrics`` answers 200 is scraped
at ``/metrics`` from then on, for as long as the endpoint keeps its address (logged once).

**Engines serving only this router's requests are scraped less often.** A page tells the router
what it cannot count itself: the requests others send the engine (replicas without replica sync,
clients going to it directly) and how the engine split the router's own between running and waiting.
One router routes as well on a 1 s-old page as on a 100 ms-old one (the fleet simulator,
docs/benchmarks/router-cpu.md round 25: its in-flight counts and pending blocks carry the load it
creates; on the emulated fleet, round 48 of docs/benchmarks/emulated-fleet.md), while at 64 engines
with thin traffic half its CPU per request was scraping at 100 ms (1.57 ms net per request against
0.97 at 1 s). Replicas without replica sync lean on the page for each other's load (p90 +16 % at a 1
s period in the simulator). So each loop compares the page with what this router can account for —
the requests it had in flight to the engine when the GET went out, plus every dispatch to it (its
own or, with replica sync, another replica's) until the page was read
(:meth:`MetricsScraper.foreign_load`) — and a page showing more running and waiting requests than
that puts the endpoint at the short period (``interval_s``) for :data:`FOREIGN_HOLD_PERIODS`
accounted periods. So does a
page showing requests waiting (:meth:`MetricsScraper.queueing`), for as long as the pages show them:
how fast an engine works off its queue is what one router cannot count, and its waiting count is
what admission control and the ``load-headroom`` filter read (round 48 of
docs/benchmarks/emulated-fleet.md: without this, TTFT p90 +22 % at 150 req/s on 16 emulated engines,
where queues form). Otherwise the endpoint is scraped about twice per dispatch to it
(:class:`AccountedPacer`): every ``accounted_interval_s`` while it is sent at most one request per
accounted period (on average), at most every ``interval_s`` however many it is sent. A page's age
that matters is how much happened on the engine since that the router did not count — its own
requests' ends, its queue worked off — which grows with the requests through the engine, not with
the seconds: at 64 emulated engines near saturation (~9 dispatches a second each) a flat 1 s page
cost 25-30 % of goodput against the 100 ms one in two runs (round 50 of
docs/benchmarks/emulated-fleet.md); twice per dispatch scrapes such engines every 100 ms and bounds
the scraping at about two pages per request (~0.06 ms of router CPU), while thin traffic (the case
the accounted period was made for) keeps the 1 s period. Round 51 measured one and two pages per
dispatch there (two kept: inside the fixed 100 ms period's run-to-run spread); round 29 of
docs/benchmarks/router-cpu.md moved the edge of thin traffic from half a request per accounted
period to one. Replicas *with* replica sync learn each other's dispatches but not their ends, so
their pages show foreign load and keep the short period, as before.
``kvroute_scrape_foreign_load_endpoints`` counts the endpoints at the short period for that reason.

**Idle engines are scraped less often still.** Most of an idle router's CPU is waking up for scrapes
(~0.3-0.65 ms each when nothing else runs, ~83 us back to back; docs/benchmarks/router-cpu.md,
round 17): 160 wake-ups a second at 16 engines, whatever the traffic. An endpoint whose last
snapshot shows nothing running or waiting, with nothing in flight to it from this router and
nothing dispatched since (:meth:`MetricsScraper.idle`), for :data:`IDLE_AFTER_PAGES` scrapes in
a row, is scraped every ``idle_interval_s`` instead (default 2 x ``accounted_interval_s``: 2 s,
under the policies' default ``staleMetricsMs`` of 3 s, so its snapshot never reads as stale).
A dispatch
to it, by this router or by another replica through replica sync
(:meth:`Endpoint.dispatched`), ends the slow pause at once: the next scrape comes
:data:`WAKE_SCRAPE_DELAY_S` later, and the engine is scraped at the normal period until it has
been idle for that many pages again. Traffic another replica sends it without replica sync
shows at the next idle scrape. A policy whose ``staleMetricsMs`` is no longer than either
period would read snapshots as stale between scrapes:
:meth:`MetricsScraper.check_staleness` warns at start and on every policy change. (The first
version paused after one idle page and scraped one interval after a wake: under traffic,
engines between requests paused, and the first busy page after a dispatch came later than
normal scraping brings it; TTFT p90 leaned ~10 % worse at 120 req/s on the emulated fleet.
docs/benchmarks/router-cpu.md, round 18.)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from urllib.parse import urlencode

from kvroute_router.datastore.store import Datastore
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.tasks import cancel_and_wait
from kvroute_router.http1.client import UpstreamConnectError
from kvroute_router.router_metrics import RouterMetrics
from kvroute_router.scrape.connection import MetricsConnection
from kvroute_router.scrape.vllm_metrics import RUNNING, WANTED, parse_vllm_metrics

log = logging.getLogger(__name__)

GOLDEN_FRACTION = 0.6180339887498949  # (√5 - 1) / 2: successive multiples spread evenly
FULL_PATH = "/metrics"
REFUSED_UNAVAILABLE_S = 2.5
"""An endpoint whose scrape could not connect is kept out of picks this long (longer than the
longest pause between a failing endpoint's scrapes, 2 s, so it stays out until one connects)."""
FILTERED_PATH = "/metrics/?" + urlencode([("name[]", name) for name in sorted(WANTED)])
"""vLLM's page restricted to the samples :func:`parse_vllm_metrics` reads."""
_RUNNING_SAMPLE = RUNNING.encode()
ACCOUNTED_INTERVAL_S = 1.0
"""The default period for an endpoint whose pages show no requests but this router's (never
shorter than the scrape interval)."""
DISPATCHES_PER_PAGE = 0.5
"""Between pages showing only this router's requests, an engine is scraped about once per this
many dispatches to it (:func:`accounted_period`)."""
ACCOUNTED_DISPATCHES = 1.0
"""An engine sent at most this many requests per accounted period, on average, keeps the
accounted period (:func:`accounted_period`): its page is then at most about one dispatch old.
At :data:`DISPATCHES_PER_PAGE` instead (round 51) a Poisson stream of 0.47 a second, 64 engines
at 30 req/s, left it whenever two requests came close: 1.28 pages a second against 1.0; 1.12 now
(docs/benchmarks/router-cpu.md rounds 28-29)."""
RATE_HORIZON_PERIODS = 1.0
"""The dispatch rate is averaged over about this many accounted periods (:func:`dispatch_rate`).
Three cut thin traffic's pages to the accounted period's 1.0 a second, but a busy engine reached
the short period ~2 s later, and 16 engines at 120 req/s leaned worse at p90 in two pairs of
fleet runs (+5 %, +23 %; router-cpu.md round 29): one kept."""
IDLE_INTERVAL_FACTOR = 2.0
"""The default idle scrape period, in accounted periods."""
FOREIGN_HOLD_PERIODS = 30.0
"""How long, in accounted periods (30 s at the default), a page showing requests this router
cannot account for keeps the endpoint at the short period: traffic from another replica without
replica sync comes and goes between two requests of it, and should not put the endpoint back at
the long period in a gap. In accounted periods, so that it stretches with the other periods (the
bench stretches them by its time dilation: a hold fixed at 30 s was ~2 s of engine time there)."""
IDLE_AFTER_PAGES = 10
"""Idle pages in a row before an endpoint is scraped at the idle period (1 s at the default
interval): a gap between requests under traffic is not idleness, and routing under traffic
reads the same snapshots as with no idle period at all. Two pages were measured twice (rounds
21 and 23 of docs/benchmarks/router-cpu.md): ~0.16 ms less CPU per request with traffic spread
thinly over 64 engines, TTFT p90/p99 level once a scrape keeps the dispatches its page does not
show, p50 leaning higher; not worth it."""
WAKE_SCRAPE_DELAY_S = 0.02
"""After a dispatch ends an idle pause, the next scrape comes this much later (or one interval,
if shorter): soon, so the engine's first busy page is no later than under normal scraping, but
not at once, when the request may not have reached the engine yet."""


def _serves_filtered_page(status: int, body: bytes) -> bool:
    """Whether an answer to :data:`FILTERED_PATH` is the restricted page: every vLLM page,
    whole or restricted, carries the running-requests gauge."""
    return status == 200 and _RUNNING_SAMPLE in body


def scrape_periods(interval_s: float, accounted_interval_s: float | None = None,
                   idle_interval_s: float | None = None) -> tuple[float, float, float]:
    """The scrape periods ``(interval, accounted, idle)`` in seconds, defaults filled in: the
    accounted period :data:`ACCOUNTED_INTERVAL_S` (at least ``interval_s``, at most an idle
    period given), the idle one :data:`IDLE_INTERVAL_FACTOR` x the accounted one. Raises
    ValueError naming the flag unless ``interval <= accounted <= idle``, all finite."""
    if not interval_s > 0 or math.isinf(interval_s):
        raise ValueError(f"--scrape-interval-ms must be a positive number of milliseconds, got "
                         f"{interval_s * 1000:g}")
    if accounted_interval_s is None:
        accounted_interval_s = max(interval_s, ACCOUNTED_INTERVAL_S)
        if idle_interval_s is not None and idle_interval_s >= interval_s:
            accounted_interval_s = min(accounted_interval_s, idle_interval_s)
    if not accounted_interval_s >= interval_s or math.isinf(accounted_interval_s):
        raise ValueError(f"--accounted-scrape-interval-ms must be a number of milliseconds no "
                         f"shorter than --scrape-interval-ms ({interval_s * 1000:g}), got "
                         f"{accounted_interval_s * 1000:g}")
    if idle_interval_s is None:
        idle_interval_s = IDLE_INTERVAL_FACTOR * accounted_interval_s
    if not idle_interval_s >= accounted_interval_s or math.isinf(idle_interval_s):
        raise ValueError(f"--idle-scrape-interval-ms must be a number of milliseconds no "
                         f"shorter than --accounted-scrape-interval-ms "
                         f"({accounted_interval_s * 1000:g}) or --scrape-interval-ms, got "
                         f"{idle_interval_s * 1000:g}")
    return interval_s, accounted_interval_s, idle_interval_s


def accounted_period(dispatch_rate: float, interval_s: float, accounted_s: float) -> float:
    """The period between pages that show only this router's requests: ``accounted_s`` while
    ``dispatch_rate`` (per second) is at most :data:`ACCOUNTED_DISPATCHES` per such period, else
    one page per :data:`DISPATCHES_PER_PAGE` dispatches, no shorter than ``interval_s``, no
    longer than ``accounted_s``."""
    if dispatch_rate * accounted_s <= ACCOUNTED_DISPATCHES:
        return accounted_s
    return min(accounted_s, max(interval_s, DISPATCHES_PER_PAGE / dispatch_rate))


def dispatch_rate(rate: float, dispatches: int, elapsed_s: float, horizon_s: float) -> float:
    """The dispatch rate (per second) averaged over about ``horizon_s`` (exponentially): the
    last estimate ``rate`` moved by ``dispatches`` seen in the ``elapsed_s`` since."""
    if elapsed_s <= 0.0:
        return rate
    weight = -math.expm1(-elapsed_s / horizon_s)
    return rate + weight * (dispatches / elapsed_s - rate)


class AccountedPacer:
    """One engine's period between pages that show only this router's requests, from the
    dispatches to it counted at each page (:func:`dispatch_rate` over
    :data:`RATE_HORIZON_PERIODS` accounted periods, then :func:`accounted_period`)."""

    def __init__(self, interval_s: float, accounted_s: float, dispatches: int,
                 now: float) -> None:
        self.interval_s, self.accounted_s = interval_s, accounted_s
        self.rate, self.counted_at, self.counted = 0.0, now, dispatches

    def period(self, dispatches: int, now: float) -> float:
        """The period after a page read at ``now`` (monotonic s), the engine's dispatch count
        ``dispatches`` then."""
        self.rate = dispatch_rate(self.rate, dispatches - self.counted, now - self.counted_at,
                                  RATE_HORIZON_PERIODS * self.accounted_s)
        self.counted_at, self.counted = now, dispatches
        return accounted_period(self.rate, self.interval_s, self.accounted_s)


class MetricsScraper:
    """Scrape loops for all endpoints of a datastore."""

    def __init__(self, datastore: Datastore, interval_s: float = 0.1,
                 timeout_s: float | None = None, metrics: RouterMetrics | None = None,
                 idle_interval_s: float | None = None,
                 accounted_interval_s: float | None = None) -> None:
        self.datastore = datastore
        self.metrics = metrics
        self.interval_s, self.accounted_interval_s, self.idle_interval_s = scrape_periods(
            interval_s, accounted_interval_s, idle_interval_s)
        self.timeout_s = timeout_s if timeout_s is not None else max(0.5, 5 * interval_s)
        self.foreign_hold_s = FOREIGN_HOLD_PERIODS * self.accounted_interval_s
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._connections: dict[int, MetricsConnection] = {}
        self._started = False
        self._loops_started = itertools.count()
        self._stale_warned: set[tuple[str, int]] = set()

    def phase_s(self, k: int) -> float:
        """The offset of the ``k``-th scrape loop started within the period it starts at (the
        accounted one: no page has shown foreign load yet)."""
        return (k * GOLDEN_FRACTION) % 1.0 * self.accounted_interval_s

    async def start(self) -> None:
        self._started = True
        self.datastore.add_listener(self._on_change)
        self.datastore.add_policy_listener(self._on_policies)
        self.check_staleness()
        self._on_change(self.datastore.endpoints(), [])

    def _on_policies(self) -> None:
        self.check_staleness()

    def check_staleness(self) -> list[str]:
        """Warn (once per policy and value) about a policy whose ``scoring.staleMetricsMs`` is
        no longer than a scrape period: its load scorers and admission would take snapshots
        as stale between two scrapes and put an average in, without a word. Returns the
        warnings given now."""
        warnings = []
        current = set()
        for key, policy in self.datastore.policies().items():
            stale_ms = policy.spec.scoring.stale_metrics_ms
            if stale_ms / 1000.0 > self.idle_interval_s:
                continue
            current.add((key, stale_ms))
            if (key, stale_ms) in self._stale_warned:
                continue
            which, period_s, whose = next(
                (flag, period, whose) for flag, period, whose in (
                    ("--scrape-interval-ms", self.interval_s, "its"),
                    ("--accounted-scrape-interval-ms", self.accounted_interval_s,
                     "its accounted"),
                    ("--idle-scrape-interval-ms", self.idle_interval_s, "its idle"))
                if stale_ms / 1000.0 <= period)
            period_ms = period_s * 1000.0
            warnings.append(
                f"RoutePolicy {key}: scoring.staleMetricsMs ({stale_ms}) is no longer than this "
                f"router's {which} ({period_ms:g}), so {whose} "
                f"endpoints' metrics read as stale between scrapes and load scoring uses "
                f"averages for them; raise staleMetricsMs above {period_ms:g} (twice is safe) "
                f"or shorten {which}")
        self._stale_warned = current  # a value that is fine again is warned about anew
        for warning in warnings:
            log.warning("%s", warning)
        return warnings

    async def stop(self) -> None:
        self._started = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(tasks, what="metrics scraper")
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def _on_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        if not self._started:
            return
        for ep in removed:
            task = self._tasks.pop(id(ep), None)
            if task is not None:
                task.cancel()
            connection = self._connections.pop(id(ep), None)
            if connection is not None:
                connection.close()
        for ep in added:
            if id(ep) not in self._tasks:
                self._tasks[id(ep)] = asyncio.get_running_loop().create_task(
                    self._loop(ep, self.phase_s(next(self._loops_started))),
                    name=f"scrape {ep.address}")

    def _count(self, ep: Endpoint, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.scrape_errors.labels(ep.pool, ep.name, reason).inc()

    async def scrape_once(self, ep: Endpoint) -> bool:
        connection = self._connections.get(id(ep))
        if connection is None or connection.address != ep.address:
            if connection is not None:
                connection.close()
            connection = self._connections[id(ep)] = MetricsConnection(ep.address,
                                                                       FILTERED_PATH)
        try:
            async with asyncio.timeout(self.timeout_s):
                status, body = await connection.get()
                if connection.path != FULL_PATH and not _serves_filtered_page(status, body):
                    status, body = await self._fall_back(ep, connection, status)
        except (TimeoutError, OSError) as exc:  # ScrapeHTTPError is an OSError
            self._count(ep, "unreachable")
            if isinstance(exc.__cause__, UpstreamConnectError):
                # Refused or unreachable, as the proxy would find it: out of picks even under
                # the healthy filter's panic rule, which keeps endpoints whose scrapes only
                # timed out (framework.endpoint.serving). Held past the next scrape's time.
                ep.unavailable_until = max(ep.unavailable_until,
                                           time.monotonic() + REFUSED_UNAVAILABLE_S)
            return self._failed(ep, exc)
        if status != 200:
            self._count(ep, "http_status")
            return self._failed(ep, RuntimeError(f"/metrics answered HTTP {status}"))
        try:
            metrics = parse_vllm_metrics(body.decode("utf-8"), time.monotonic())
        except ValueError as exc:  # MetricsParseError, UnicodeDecodeError
            self._count(ep, "bad_page")
            if ep.metrics is not None:
                log.warning("scrape of %s: bad /metrics page (%s); its metrics are stale "
                            "until a good page", ep.address, exc)
            ep.metrics = None
            return False
        ep.took_snapshot(metrics)
        if ep.scrape_failures >= 3:
            log.info("scrape of %s succeeds again", ep.address)
        ep.scrape_failures = 0
        return True

    @staticmethod
    async def _fall_back(ep: Endpoint, connection: MetricsConnection,
                         filtered_status: int) -> tuple[int, bytes]:
        """The filtered page was not served: the whole page for this scrape, kept to from now
        on only if the filtered one was refused (a 4xx, or a 200 that is not vLLM's page). A
        5xx says nothing about the filtered page — an engine starting up answers 503 on both,
        and one that came up between the two requests would otherwise be scraped whole for
        good — so the next scrape tries the filtered page again."""
        connection.path = FULL_PATH
        status, body = await connection.get()
        if status == 200 and filtered_status < 500:
            log.info("%s does not serve vLLM's filtered metrics page (%s); scraping %s",
                     ep.address, FILTERED_PATH.split("?")[0], FULL_PATH)
        else:  # a transient answer, or neither answered: the filtered page next time
            connection.path = FILTERED_PATH
        return status, body

    @staticmethod
    def _failed(ep: Endpoint, exc: BaseException) -> bool:
        ep.scrape_failures += 1
        if ep.scrape_failures in (1, 3):
            log.info("scrape of %s failed (%d in a row): %s", ep.address, ep.scrape_failures,
                     exc)
        return False

    @staticmethod
    def foreign_load(ep: Endpoint, accountable: int) -> bool:
        """Whether the endpoint's snapshot shows more requests running and waiting than the
        ``accountable`` ones: this router's in flight to it when the page was asked for, plus
        the dispatches to it since (any of them may be on the page)."""
        m = ep.metrics
        return m is not None and m.running + m.waiting > accountable

    @staticmethod
    def queueing(ep: Endpoint) -> bool:
        """Whether the endpoint's snapshot shows requests waiting: how fast the engine works
        its queue off is what the page says that this router cannot count itself."""
        return ep.metrics is not None and ep.metrics.waiting > 0

    @staticmethod
    def idle(ep: Endpoint) -> bool:
        """Nothing running or waiting in the endpoint's snapshot, nothing in flight to it from
        this router and nothing dispatched to it since the snapshot."""
        m = ep.metrics
        return (m is not None and m.running == 0 and m.waiting == 0 and ep.in_flight == 0
                and ep.dispatched_since_scrape == 0)

    @staticmethod
    async def _idle_pause(ep: Endpoint, due: float) -> bool:
        """Sleep until ``due`` (monotonic) or a dispatch to the endpoint, whichever is first;
        whether a dispatch ended it."""
        wake = ep.idle_scrape_wake = asyncio.Event()
        try:
            async with asyncio.timeout(max(0.0, due - time.monotonic())):
                await wake.wait()
        except TimeoutError:
            return False
        finally:
            ep.idle_scrape_wake = None
        return True

    async def _loop(self, ep: Endpoint, phase_s: float = 0.0) -> None:
        offset = phase_s  # added to the first pause only: the loop keeps its phase after
        idle_pages = 0
        adapts = self.accounted_interval_s > self.interval_s
        foreign_until = -math.inf  # monotonic: the short period until then
        pacer = AccountedPacer(self.interval_s, self.accounted_interval_s, ep.dispatches,
                               time.monotonic())
        foreign_gauge = (None if self.metrics is None or not adapts
                         else self.metrics.scrape_foreign_load_endpoints.labels(ep.pool))
        counted = False
        scrapes = None if self.metrics is None else self.metrics.scrapes.labels(ep.pool)
        try:
            while True:
                started = time.monotonic()
                if scrapes is not None:
                    scrapes.inc()
                in_flight, dispatches = ep.in_flight, ep.dispatches
                try:
                    ok = await self.scrape_once(ep)
                except Exception:  # never let one endpoint's scrape loop die
                    log.exception("scrape of %s failed unexpectedly", ep.address)
                    self._count(ep, "bad_page")
                    ep.metrics = None
                    ok = False
                now = time.monotonic()
                if ok and adapts and self.foreign_load(
                        ep, in_flight + ep.dispatches - dispatches):
                    foreign_until = now + self.foreign_hold_s
                foreign = now < foreign_until
                if foreign_gauge is not None and foreign != counted:
                    foreign_gauge.inc() if foreign else foreign_gauge.dec()
                    counted = foreign
                accounted = pacer.period(ep.dispatches, now)
                period = self.interval_s if foreign or self.queueing(ep) else accounted
                idle_pages = await self._pause(ep, ok, period, idle_pages, started + offset)
                offset = 0.0
        finally:
            if foreign_gauge is not None and counted:
                foreign_gauge.dec()

    async def _pause(self, ep: Endpoint, ok: bool, period: float, idle_pages: int,
                     since: float) -> int:
        """Wait until the endpoint's next scrape is due: ``period`` (the one its last page
        called for), the idle pause or a failing endpoint's back-off, counted from ``since``
        (monotonic: the last scrape's start, the loop's phase added on its first pause); the
        count of idle pages in a row from then on."""
        slows = self.idle_interval_s > self.interval_s
        idle_pages = idle_pages + 1 if ok and slows and self.idle(ep) else 0
        if idle_pages >= IDLE_AFTER_PAGES:
            gauge = (None if self.metrics is None
                     else self.metrics.scrape_idle_endpoints.labels(ep.pool))
            if gauge is not None:
                gauge.inc()
            try:
                woken = await self._idle_pause(ep, since + self.idle_interval_s)
            finally:
                if gauge is not None:
                    gauge.dec()
            if woken:  # by a dispatch: the engine's first busy page, soon
                idle_pages = 0
                await asyncio.sleep(min(self.interval_s, WAKE_SCRAPE_DELAY_S))
            return idle_pages
        # Back off on an endpoint that keeps failing (up to 2 s), not on a healthy one.
        pause = period if ok else min(2.0, self.interval_s * (1 + ep.scrape_failures))
        await asyncio.sleep(max(0.0, pause - (time.monotonic() - since)))
        return idle_pages
