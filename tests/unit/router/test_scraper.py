"""The metrics scraper against a real HTTP server on loopback: a bad page (a non-finite or
non-numeric value, undecodable bytes) is counted, drops the endpoint's snapshot, and the
scrape loop keeps going — the next good page is read; the page is asked for restricted to the
series the router reads, and an engine that does not serve that is scraped whole."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from kvroute_router.datastore.store import Datastore
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.router_metrics import RouterMetrics
from kvroute_router.scrape import scraper as scraper_module
from kvroute_router.scrape.scraper import (
    FILTERED_PATH,
    IDLE_AFTER_PAGES,
    AccountedPacer,
    MetricsScraper,
    accounted_period,
    dispatch_rate,
    scrape_periods,
)
from kvroute_router.scrape.vllm_metrics import WANTED, MetricsParseError, parse_vllm_metrics

from tests.aiohttp_server import serving
from tests.unit.router.router_fixtures import make_policy, make_pool

GOOD = ('vllm:num_requests_running{engine="0"} 3.0\n'
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="100"} 1.0\n')
INFINITE_LABEL = (b'vllm:cache_config_info{block_size="inf",num_gpu_blocks="100"} 1.0\n'
                  b'vllm:num_requests_running{engine="0"} 4.0\n')  # int(float("inf")) raised
BAD_PAGES = [
    b'vllm:num_requests_running{engine="0"} NaN\n',
    b'vllm:num_requests_waiting{engine="0"} three\n',
    b'vllm:num_requests_running{engine="0"} 1.0\n\xff\xfe\n',
]


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _scraping(app: web.Application,
                    metrics: RouterMetrics | None = None) -> AsyncIterator[Endpoint]:
    """One endpoint served by ``app``, scraped every 10 ms while the block runs."""
    async with serving(app) as url:
        store = Datastore()
        store.replace([make_pool("p", count=1, base_port=int(url.rsplit(":", 1)[1]))], [])
        scraper = MetricsScraper(store, interval_s=0.01, metrics=metrics)
        (ep,) = store.endpoints()
        await scraper.start()
        try:
            yield ep
        finally:
            await scraper.stop()


def test_the_parser_rejects_non_finite_and_non_numeric_values() -> None:
    for page in BAD_PAGES[:2]:
        try:
            parse_vllm_metrics(page.decode(), 0.0)
        except MetricsParseError as exc:
            assert "vllm:num_requests" in str(exc)
        else:
            raise AssertionError(f"accepted {page!r}")
    # An infinite label value is not a number of blocks: ignored, not a crash.
    assert parse_vllm_metrics(INFINITE_LABEL.decode(), 0.0).block_size is None


async def test_a_bad_page_is_counted_marks_metrics_stale_and_scraping_goes_on() -> None:
    page: dict[str, bytes] = {"body": GOOD.encode()}

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=page["body"], content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    async with serving(app) as url:
        port = int(url.rsplit(":", 1)[1])
        store = Datastore()
        store.replace([make_pool("p", count=1, base_port=port)], [])
        router_metrics = RouterMetrics()
        scraper = MetricsScraper(store, interval_s=0.02, metrics=router_metrics)
        await scraper.start()
        try:
            (ep,) = store.endpoints()
            await _until(lambda: ep.metrics is not None and ep.metrics.running == 3.0, "a scrape")
            page["body"] = INFINITE_LABEL  # this used to end the endpoint's scrape loop
            await _until(lambda: ep.metrics is not None and ep.metrics.running == 4.0,
                         "the page with an infinite block size")
            assert ep.metrics is not None and ep.metrics.block_size is None
            for number, bad in enumerate(BAD_PAGES, start=1):
                page["body"] = bad
                await _until(lambda: ep.metrics is None, f"bad page {number} to drop the snapshot")
                count = router_metrics.registry.get_sample_value(
                    "kvroute_scrape_errors_total",
                    {"pool": ep.pool, "endpoint": ep.name, "reason": "bad_page"})
                assert count is not None and count >= number
                assert ep.scrape_failures == 0  # the engine answered: not "down"
                page["body"] = GOOD.encode()
                await _until(lambda: ep.metrics is not None, f"a good page after bad page {number}")
                assert ep.metrics is not None and ep.metrics.block_size == 16
        finally:
            await scraper.stop()


async def test_endpoints_loaded_together_are_not_scraped_in_lock_step() -> None:
    """A pool's endpoints appear at once; their scrape loops must not stay in phase, or every
    interval the router parses all their pages back to back while requests wait (round 9 of
    docs/benchmarks/router-cpu.md). Each loop scrapes at once, then at its own offset."""
    from kvroute_api.inference_pool import InferencePool

    arrivals: dict[int, list[float]] = {}

    async def metrics(request: web.Request) -> web.Response:
        port = request.transport.get_extra_info("sockname")[1] if request.transport else 0
        arrivals.setdefault(port, []).append(time.monotonic())
        return web.Response(body=GOOD.encode(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    count, interval = 16, 0.2
    try:
        for _ in range(count):
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        ports = [address[1] for address in runner.addresses]
        pool = InferencePool.model_validate({
            "apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": "p"},
            "spec": {"mode": "External", "model": {"name": "m"}, "resources": {"gpus": 0},
                     "endpoints": [{"name": f"p-{i}", "address": f"127.0.0.1:{port}"}
                                   for i, port in enumerate(ports)]}}, by_alias=True)
        store = Datastore()
        store.replace([pool], [])
        scraper = MetricsScraper(store, interval_s=interval, accounted_interval_s=interval)
        await scraper.start()
        try:
            await _until(lambda: all(len(arrivals.get(p, [])) >= 3 for p in ports),
                         "three scrapes of every endpoint")
        finally:
            await scraper.stop()
    finally:
        await runner.cleanup()
    first = [arrivals[p][0] for p in ports]
    assert max(first) - min(first) < interval / 2  # the first scrape of each: at once
    # Their second and third scrapes, reduced to a phase within the interval.
    phases = sorted(((arrivals[p][i] - min(first)) % interval) for p in ports for i in (1, 2))
    widest = max(sum(1 for q in phases if lo <= q < lo + interval / 10) for lo in phases)
    assert widest <= count // 2, f"{widest} of {2 * count} scrapes within {interval / 10} s"


async def _scrape_against(app: web.Application, scrapes: int) -> tuple[Any, RouterMetrics]:
    """Run the scraper against ``app`` until ``scrapes`` good snapshots were swapped in; the
    endpoint and the router metrics."""
    router_metrics = RouterMetrics()
    seen: list[object] = []
    async with _scraping(app, router_metrics) as ep:
        def fresh() -> bool:
            if ep.metrics is not None and (not seen or seen[-1] is not ep.metrics):
                seen.append(ep.metrics)
            return len(seen) >= scrapes
        await _until(fresh, f"{scrapes} scrapes")
    return ep, router_metrics


async def test_the_scraper_asks_vllm_for_only_the_series_it_reads() -> None:
    """vLLM's ``/metrics/`` restricts the page to the ``name[]`` samples (~2 KB of ~54 KB, a
    tenth of the engine's CPU per GET): the scraper asks for exactly the series its parser
    reads, there, every time."""
    asked: list[tuple[str, list[str]]] = []

    async def restricted(request: web.Request) -> web.Response:
        asked.append((request.path, request.query.getall("name[]", [])))
        return web.Response(body=GOOD.encode(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics/", restricted)
    app.router.add_get("/metrics", restricted)
    ep, _ = await _scrape_against(app, 3)
    assert ep.metrics is not None and ep.metrics.running == 3.0 and ep.metrics.block_size == 16
    assert {path for path, _ in asked} == {"/metrics/"}
    assert all(sorted(names) == sorted(WANTED) for _, names in asked)
    assert FILTERED_PATH.startswith("/metrics/?name%5B%5D=")


async def test_an_engine_without_the_restricted_page_is_scraped_whole() -> None:
    """A 404 (or a redirect, or a 200 that is not a vLLM page) at ``/metrics/`` while
    ``/metrics`` answers: the scraper reads ``/metrics`` from then on — asked once, not on
    every scrape — and nothing counts as a failure."""
    for answer in (web.Response(status=404, text="not found"),
                   web.Response(status=307, headers={"Location": "/metrics"}),
                   web.Response(status=200, text="<html>an index page</html>")):
        asked: list[str] = []

        async def whole(request: web.Request, asked: list[str] = asked) -> web.Response:
            asked.append(request.path)
            return web.Response(body=GOOD.encode(), content_type="text/plain")

        async def other(request: web.Request, answer: web.Response = answer,
                        asked: list[str] = asked) -> web.Response:
            asked.append(request.path)
            return web.Response(status=answer.status, body=answer.body,
                                headers={k: v for k, v in answer.headers.items()
                                         if k == "Location"})

        app = web.Application()
        app.router.add_get("/metrics", whole)
        app.router.add_get("/metrics/", other)
        ep, router_metrics = await _scrape_against(app, 4)
        assert ep.metrics is not None and ep.metrics.running == 3.0, answer.status
        assert asked[0] == "/metrics/" and asked.count("/metrics/") == 1, (answer.status, asked)
        assert asked.count("/metrics") >= 4
        assert ep.scrape_failures == 0
        for reason in ("unreachable", "http_status", "bad_page"):
            assert not router_metrics.registry.get_sample_value(
                "kvroute_scrape_errors_total",
                {"pool": ep.pool, "endpoint": ep.name, "reason": reason}), reason


async def test_when_neither_page_answers_the_restricted_one_is_tried_again() -> None:
    """An engine answering 503 on both (starting up) is a failed scrape, and the scraper does
    not settle for the whole page: once the engine is up it reads the restricted one."""
    state = {"up": False}
    asked: list[str] = []

    async def page(request: web.Request) -> web.Response:
        asked.append(request.path)
        if not state["up"]:
            return web.Response(status=503, text="starting")
        return web.Response(body=GOOD.encode(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", page)
    app.router.add_get("/metrics/", page)
    async with _scraping(app) as ep:
        await _until(lambda: asked.count("/metrics/") >= 2, "two tries of both pages")
        assert ep.metrics is None and ep.scrape_failures >= 1
        state["up"] = True
        await _until(lambda: ep.metrics is not None, "a scrape once the engine is up")
        count = len(asked)
        await _until(lambda: len(asked) >= count + 3, "three more scrapes")
    assert set(asked[count:]) == {"/metrics/"}


async def test_an_engine_coming_up_between_the_two_pages_is_not_scraped_whole_for_good() -> None:
    """The filtered page answers 503 (starting) and the whole page, asked right after, 200:
    that scrape reads the whole page, and the next ones the filtered page again — a 5xx does
    not mean the engine lacks the filtered page."""
    asked: list[str] = []

    async def filtered(request: web.Request) -> web.Response:
        asked.append(request.path)
        if asked.count("/metrics/") == 1:
            return web.Response(status=503, text="starting")
        return web.Response(body=GOOD.encode(), content_type="text/plain")

    async def whole(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.Response(body=GOOD.encode(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics/", filtered)
    app.router.add_get("/metrics", whole)
    async with _scraping(app) as ep:
        await _until(lambda: len(asked) >= 5, "five page requests")
    assert ep.metrics is not None
    assert asked[:2] == ["/metrics/", "/metrics"]
    assert set(asked[2:]) == {"/metrics/"}


async def test_a_refused_scrape_keeps_the_endpoint_out_a_timed_out_one_does_not() -> None:
    """The panic rule routes among endpoints whose scrapes failed but that did not refuse a
    connection; the scraper tells the two apart: nothing listening marks the endpoint
    unavailable (as the proxy does), a page that does not come in time only counts a failure."""
    import socket

    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    store = Datastore()
    store.replace([make_pool("p", count=1, base_port=dead_port)], [])
    scraper = MetricsScraper(store, interval_s=0.05)
    (ep,) = store.endpoints()
    assert not await scraper.scrape_once(ep)
    assert ep.scrape_failures == 1 and ep.unavailable_until > time.monotonic() + 2.0
    await scraper.stop()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(body=GOOD.encode(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics/", slow)
    async with serving(app) as url:
        store = Datastore()
        store.replace([make_pool("p", count=1, base_port=int(url.rsplit(":", 1)[1]))], [])
        scraper = MetricsScraper(store, interval_s=0.05, timeout_s=0.1)
        (ep,) = store.endpoints()
        try:
            assert not await scraper.scrape_once(ep)
        finally:
            await scraper.stop()
        assert ep.scrape_failures == 1 and ep.unavailable_until == 0.0


@pytest.mark.parametrize("value", ["0", "-100", "nan", "inf", "soon"])
def test_the_cli_refuses_a_scrape_interval_that_is_not_a_positive_duration(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--scrape-interval-ms 0`` made every scrape loop sleep 0 s: 16 engines scraped back to
    back for as long as the router ran. It is refused, naming the flag."""
    from kvroute_cli.main import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["router", "--scrape-interval-ms", value])
    assert exited.value.code == 2
    assert "--scrape-interval-ms" in capsys.readouterr().err
    assert build_parser().parse_args(["router", "--scrape-interval-ms", "250"]
                                     ).scrape_interval_ms == 250.0
    assert build_parser().parse_args(["router", "--loop-lag-probe-ms", "0"]
                                     ).loop_lag_probe_ms == 0.0  # 0 turns the probe off


def test_the_scraper_refuses_an_interval_that_is_not_positive() -> None:
    for interval in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--scrape-interval-ms"):
            MetricsScraper(Datastore(), interval_s=interval)


IDLE = 'vllm:num_requests_running{engine="0"} 0.0\nvllm:num_requests_waiting{engine="0"} 0.0\n'
BUSY = 'vllm:num_requests_running{engine="0"} 2.0\nvllm:num_requests_waiting{engine="0"} 0.0\n'


class Engine:
    """A /metrics page on loopback whose body a test sets (``page``, or ``pages(count)`` by the
    number of scrapes so far), the times it was scraped, and a scraper of it (interval 10-20 ms,
    an idle period of 30 s: far longer than any wait in these tests, so every scrape counted
    after an idle pause began is one a wake or a busy page caused). The accounted period is
    the interval unless a test gives one. ``on_get`` runs as a GET arrives, before the page is
    written."""

    def __init__(self, pages: Callable[[int], str] | None = None) -> None:
        self.page = IDLE
        self.pages = pages
        self.gets: list[float] = []
        self.router_metrics = RouterMetrics()
        self.on_get: Callable[[], None] | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        self.gets.append(time.monotonic())
        if self.on_get is not None:
            self.on_get()
        body = self.page if self.pages is None else self.pages(len(self.gets))
        return web.Response(text=body, content_type="text/plain")

    @contextlib.asynccontextmanager
    async def scraped(self, interval_s: float, accounted_s: float | None = None
                      ) -> AsyncIterator[Endpoint]:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        async with serving(app) as url:
            store = Datastore()
            store.replace([make_pool("p", count=1, base_port=int(url.rsplit(":", 1)[1]))], [])
            scraper = MetricsScraper(store, interval_s=interval_s, idle_interval_s=30.0,
                                     accounted_interval_s=accounted_s or interval_s,
                                     metrics=self.router_metrics)
            await scraper.start()
            try:
                (ep,) = store.endpoints()
                yield ep
            finally:
                await scraper.stop()

    def idle_gauge(self, ep: Endpoint) -> float | None:
        return self.router_metrics.registry.get_sample_value("kvroute_scrape_idle_endpoints",
                                                             {"pool": ep.pool})

    def foreign_gauge(self, ep: Endpoint) -> float | None:
        return self.router_metrics.registry.get_sample_value(
            "kvroute_scrape_foreign_load_endpoints", {"pool": ep.pool})


async def test_an_engine_serving_only_this_routers_requests_is_scraped_at_the_accounted_period(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At 64 engines with thin traffic half of one router's CPU per request was scraping
    (router-cpu.md round 25), for pages that only confirm what it counts itself. A page showing
    more requests than this router has in flight (another replica's, a direct client's) keeps
    the short period, for FOREIGN_HOLD_PERIODS accounted periods after the last such page; once
    the pages show only this router's requests, the engine is scraped at the accounted period."""
    monkeypatch.setattr(scraper_module, "FOREIGN_HOLD_PERIODS", 0.01)  # 0.3 s of 30 s periods
    engine = Engine()
    engine.page = BUSY  # two running, none of them this router's
    gets = engine.gets
    async with engine.scraped(0.01, accounted_s=30.0) as ep:
        await _until(lambda: len(gets) >= 6, "scrapes at the short period")
        assert engine.foreign_gauge(ep) == 1.0
        ep.in_flight = 2  # the two are this router's now
        await _until(lambda: engine.foreign_gauge(ep) == 0.0, "the hold to run out")
        scraped = len(gets)
        await asyncio.sleep(0.3)  # 30 scrapes at the short period
        assert len(gets) == scraped, gets
    assert engine.foreign_gauge(ep) == 0.0


async def test_the_foreign_load_hold_stretches_with_the_accounted_period() -> None:
    """The hold is counted in accounted periods, so a router whose periods are stretched (the
    bench stretches them by its time dilation) holds the short period as long in engine time:
    a hold fixed at 30 s was ~2 s of engine time in a 16x dilated fleet run. At a 20 ms
    accounted period it is 0.6 s; fixed, the short period would outlast this test."""
    engine = Engine()
    engine.page = BUSY  # two running, none of them this router's
    async with engine.scraped(0.01, accounted_s=0.02) as ep:
        await _until(lambda: engine.foreign_gauge(ep) == 1.0, "a page showing foreign load")
        ep.in_flight = 2  # the two are this router's now
        held = time.monotonic()
        await _until(lambda: engine.foreign_gauge(ep) == 0.0, "the hold to run out", 10.0)
        assert time.monotonic() - held >= 0.5  # about 30 accounted periods, not one


async def test_a_dispatch_racing_the_page_is_not_foreign_load() -> None:
    """A request dispatched while the page is on its way may be on it: the page is compared
    with this router's in-flight requests when it asked for the page plus every dispatch
    since, so that request does not put the engine at the short period."""
    engine = Engine()
    engine.page = BUSY
    gets = engine.gets
    async with engine.scraped(0.01, accounted_s=30.0) as ep:
        ep.in_flight = 1

        def dispatch() -> None:  # as Director.dispatch does, between the GET and the page
            engine.on_get = None
            ep.in_flight += 1
            ep.dispatched()

        engine.on_get = dispatch
        await _until(lambda: ep.metrics is not None, "the first page")
        await asyncio.sleep(0.2)
        assert len(gets) == 1 and engine.foreign_gauge(ep) in (None, 0.0)
        assert engine.router_metrics.registry.get_sample_value(
            "kvroute_scrapes_total", {"pool": ep.pool}) == 1.0


def test_the_accounted_period_is_about_two_pages_per_dispatch() -> None:
    """Engines sent at most one request per accounted period keep it; busier ones are
    scraped about twice per dispatch, never oftener than the interval."""
    assert accounted_period(0.0, 0.1, 1.0) == 1.0
    assert accounted_period(0.4, 0.1, 1.0) == 1.0
    assert accounted_period(0.9, 0.1, 1.0) == 1.0  # under one request a page: still one page
    assert accounted_period(1.1, 0.1, 1.0) == pytest.approx(0.5 / 1.1)
    assert accounted_period(2.0, 0.1, 1.0) == pytest.approx(0.25)
    assert accounted_period(4.0, 0.1, 1.0) == pytest.approx(0.125)
    assert accounted_period(9.4, 0.1, 1.0) == 0.1  # 64 engines at 600 req/s: the interval
    assert accounted_period(500.0, 0.1, 1.0) == 0.1
    assert dispatch_rate(5.0, 0, 0.0, 1.0) == 5.0  # no time passed: no news
    assert dispatch_rate(0.0, 10, 1.0, 1.0) == pytest.approx(10 * (1 - math.exp(-1)))
    rate = 0.0
    for _ in range(100):  # a steady 10 a second, counted every 100 ms: the average is 10
        rate = dispatch_rate(rate, 1, 0.1, 1.0)
    assert rate == pytest.approx(10.0, rel=1e-3)


async def test_an_engine_sent_many_requests_is_scraped_about_once_per_dispatch() -> None:
    """A page's age that matters is how much happened on the engine since that this router did
    not count (its own requests' ends, the engine's queue worked off), which grows with the
    requests through the engine: a flat 1 s page cost 25-30 % of goodput at 64 emulated
    engines near saturation (emulated-fleet.md rounds 50-51). An engine whose pages show only this
    router's requests but which is sent one every 20 ms is scraped far oftener than the 0.5 s
    accounted period, and at that period again once the dispatches stop."""
    engine = Engine()
    engine.page = BUSY
    gets = engine.gets
    async with engine.scraped(0.01, accounted_s=0.5) as ep:
        ep.in_flight = 2  # the page's two are this router's: no foreign load
        await _until(lambda: len(gets) >= 2, "the second page")
        for _ in range(75):  # 1.5 s of a dispatch every 20 ms
            ep.dispatched()
            await asyncio.sleep(0.02)
        scraped = len(gets)
        for _ in range(50):  # 1 s more of them: ~50 pages, 2 at the accounted period
            ep.dispatched()
            await asyncio.sleep(0.02)
        assert len(gets) - scraped >= 10, gets
        assert engine.foreign_gauge(ep) in (None, 0.0)
        await asyncio.sleep(3.0)  # no dispatches: the average decays below 2 a second
        scraped = len(gets)
        await asyncio.sleep(1.0)
        assert len(gets) - scraped <= 3, gets


async def test_an_engine_with_a_queue_is_scraped_at_the_short_period() -> None:
    """Requests waiting on an engine: how fast it works them off is what this router cannot
    count itself, and admission reads the waiting count. Such pages keep the short period even
    when every request on them is this router's."""
    queued = ('vllm:num_requests_running{engine="0"} 1.0\n'
              'vllm:num_requests_waiting{engine="0"} 1.0\n')
    engine = Engine()
    engine.page = queued
    gets = engine.gets
    async with engine.scraped(0.01, accounted_s=30.0) as ep:
        ep.in_flight = 2  # both this router's
        await _until(lambda: len(gets) >= 6, "scrapes at the short period")
        assert engine.foreign_gauge(ep) in (None, 0.0)
        engine.page = BUSY  # two running, none waiting: the accounted period
        await _until(lambda: ep.metrics is not None and ep.metrics.waiting == 0, "the page")
        scraped = len(gets)
        await asyncio.sleep(0.3)
        assert len(gets) == scraped, gets


def test_scrape_periods_and_their_defaults() -> None:
    assert scrape_periods(0.1) == (0.1, 1.0, 2.0)
    assert scrape_periods(1.0, None, 2.0) == (1.0, 1.0, 2.0)  # the setting round 26 measured
    assert scrape_periods(0.1, None, 0.5) == (0.1, 0.5, 0.5)  # an idle period given caps it
    assert scrape_periods(2.0) == (2.0, 2.0, 4.0)  # never shorter than the short period
    assert scrape_periods(0.1, 0.1) == (0.1, 0.1, 0.2)  # equal to it: no adapting
    with pytest.raises(ValueError, match="--accounted-scrape-interval-ms must"):
        scrape_periods(0.2, 0.1)
    with pytest.raises(ValueError, match="--idle-scrape-interval-ms must"):
        scrape_periods(0.1, 1.0, 0.5)


async def test_an_idle_engine_is_scraped_slowly_until_a_request_is_sent_to_it() -> None:
    """Waking up for scrapes was most of an idle router's CPU (160 a second at 16 engines,
    router-cpu.md round 17). An engine with nothing running, waiting or in flight is scraped at
    the idle period; a dispatch to it brings the next scrape at once, and while it is busy it
    is scraped at the normal period again."""
    engine = Engine()
    gets = engine.gets
    async with engine.scraped(0.02) as ep:
        await _until(lambda: ep.idle_scrape_wake is not None, "the idle pause")
        assert MetricsScraper.idle(ep)
        assert len(gets) == IDLE_AFTER_PAGES, gets
        await asyncio.sleep(0.5)  # 25 scrapes at the normal period
        assert len(gets) == IDLE_AFTER_PAGES, gets
        engine.page = BUSY  # the request this dispatch stands for is running
        ep.dispatched()  # as Director.dispatch and ReplicaSync.apply do
        await _until(lambda: len(gets) >= IDLE_AFTER_PAGES + 8,
                     "scrapes of a busy engine at the normal period")
        assert ep.metrics is not None and ep.metrics.running == 2.0
        assert ep.dispatched_since_scrape == 0
        engine.page = IDLE  # done: after IDLE_AFTER_PAGES pages, the slow period again
        await _until(lambda: ep.idle_scrape_wake is not None, "the idle pause again")
        scraped = len(gets)
        await asyncio.sleep(0.5)
        assert len(gets) == scraped


async def test_after_a_dispatch_the_first_page_is_read_soon_but_not_at_once() -> None:
    """A dispatch (here: another replica's, through replica sync) wakes an idle endpoint's
    scrape loop; its request reaches the engine a moment later. The next scrape comes
    WAKE_SCRAPE_DELAY_S after the wake: soon (the first version waited a whole interval, longer
    than normal scraping takes on average to show a new request), and not at once, when the
    page could still read idle. (Timers fire in deadline order: the page changes 5 ms after the
    dispatch, before a scrape due 20 ms after it.)"""
    engine = Engine()
    gets = engine.gets
    async with engine.scraped(0.01) as ep:
        await _until(lambda: ep.idle_scrape_wake is not None, "the idle pause")
        scraped = len(gets)
        asyncio.get_running_loop().call_later(0.005, setattr, engine, "page", BUSY)
        ep.dispatched()
        await _until(lambda: len(gets) > scraped, "the scrape the dispatch brings")
        assert gets[scraped] - gets[scraped - 1] < 15.0  # not the idle period's scrape
        assert ep.metrics is not None and ep.metrics.running == 2.0


async def test_a_gap_between_requests_is_not_idleness() -> None:
    """Only an endpoint idle for IDLE_AFTER_PAGES scrapes in a row is scraped slowly: under
    traffic, an engine between two requests keeps the normal period (the first version paused
    after one idle page)."""
    engine = Engine(lambda scraped: BUSY if scraped % IDLE_AFTER_PAGES == 0 else IDLE)
    async with engine.scraped(0.01) as ep:
        await _until(lambda: len(engine.gets) >= 4 * IDLE_AFTER_PAGES, "scrapes of a busy engine")
        assert ep.idle_scrape_wake is None
    assert engine.idle_gauge(ep) in (None, 0.0)


async def test_the_idle_pause_begins_after_enough_idle_pages_and_is_counted() -> None:
    engine = Engine()
    async with engine.scraped(0.01) as ep:
        await _until(lambda: ep.idle_scrape_wake is not None, "the idle pause")
        assert len(engine.gets) == IDLE_AFTER_PAGES
        assert engine.idle_gauge(ep) == 1.0
    assert engine.idle_gauge(ep) == 0.0


def test_what_counts_as_idle() -> None:
    store = Datastore()
    store.replace([make_pool("p", count=1)], [])
    (ep,) = store.endpoints()
    assert not MetricsScraper.idle(ep)  # never scraped
    ep.metrics = parse_vllm_metrics(IDLE, time.monotonic())
    assert MetricsScraper.idle(ep)
    ep.in_flight = 1  # this router's request, not in the snapshot yet
    assert not MetricsScraper.idle(ep)
    ep.in_flight = 0
    ep.dispatched()
    assert not MetricsScraper.idle(ep)
    ep.unseen.clear()
    ep.metrics = parse_vllm_metrics(BUSY, time.monotonic())
    assert not MetricsScraper.idle(ep)
    ep.metrics = parse_vllm_metrics(
        'vllm:num_requests_running{engine="0"} 0.0\nvllm:num_requests_waiting{engine="0"} 1.0\n',
        time.monotonic())
    assert not MetricsScraper.idle(ep)


def test_another_replicas_dispatch_wakes_an_idle_scrape() -> None:
    from kvroute_router.framework.registry import SharedServices
    from kvroute_router.replicasync.sync import ReplicaSync
    from kvroute_router.replicasync.wire import DispatchRecord
    from prometheus_client import CollectorRegistry

    store = Datastore()
    store.replace([make_pool("p", count=1)], [])
    (ep,) = store.endpoints()
    ep.metrics = parse_vllm_metrics(IDLE, time.monotonic())
    ep.idle_scrape_wake = wake = asyncio.Event()
    sync = ReplicaSync(None, store, SharedServices(), CollectorRegistry())
    assert sync.apply(DispatchRecord(pool_key=ep.pool, endpoint=ep.name), b"B" * 16) == "applied"
    assert wake.is_set() and ep.dispatched_since_scrape == 1


def test_the_idle_scrape_period_is_no_shorter_than_the_scrape_interval(
        capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    from kvroute_cli.main import main

    scraper = MetricsScraper(Datastore(), interval_s=0.2)
    assert scraper.idle_interval_s == pytest.approx(2.0)  # 2x the accounted 1 s by default
    for idle in (0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--idle-scrape-interval-ms"):
            MetricsScraper(Datastore(), interval_s=0.2, idle_interval_s=idle)
    config = tmp_path / "pool.yaml"
    config.write_text("")
    assert main(["router", "--config", str(config), "--scrape-interval-ms", "200",
                 "--idle-scrape-interval-ms", "100"]) == 2
    assert "--idle-scrape-interval-ms" in capsys.readouterr().out


def test_the_cli_help_states_the_idle_page_count_the_scraper_uses(
        capsys: pytest.CaptureFixture[str]) -> None:
    # The help text says the number (the CLI does not import the router to build its parser);
    # this keeps it equal to the scraper's constant.
    from kvroute_cli.main import main

    with pytest.raises(SystemExit):
        main(["router", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"for {IDLE_AFTER_PAGES} scrapes in a row" in help_text


async def test_a_dispatch_sent_while_the_page_was_on_its_way_stays_counted() -> None:
    """A scrape forgot every dispatch counted before its page arrived (the count was reset to
    0), also one sent after the engine wrote the page, which the page cannot show:
    on the emulated fleet 9 % of the dispatches followed by a scrape were not on the page that
    reset the count (router-cpu.md round 22). What stays counted is this router's in-flight
    requests beyond the page's running + waiting, at most what was counted."""
    store = Datastore()
    ep_box: list[Endpoint] = []

    async def metrics(request: web.Request) -> web.Response:
        (ep,) = ep_box
        page = BUSY  # the two requests dispatched before the scrape are running
        ep.in_flight += 1  # and one more is sent while the page is on its way
        ep.dispatched()
        return web.Response(text=page, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    async with serving(app) as url:
        store.replace([make_pool("p", count=1, base_port=int(url.rsplit(":", 1)[1]))], [])
        (ep,) = store.endpoints()
        ep_box.append(ep)
        scraper = MetricsScraper(store, interval_s=1.0)
        try:
            ep.in_flight = 2
            ep.dispatched()
            ep.dispatched()
            assert await scraper.scrape_once(ep)
            assert ep.metrics is not None and ep.metrics.running == 2.0
            assert ep.dispatched_since_scrape == 1  # the one the page does not show
            assert ep.waiting_estimate() == 1.0
            assert ep.running_estimate() == 3.0
        finally:
            await scraper.stop()


def test_a_snapshot_keeps_no_more_dispatches_than_were_counted() -> None:
    store = Datastore()
    store.replace([make_pool("p", count=1)], [])
    (ep,) = store.endpoints()
    ep.in_flight = 5  # e.g. long requests the engine finished but whose answers are still read
    ep.dispatched()
    ep.took_snapshot(parse_vllm_metrics(IDLE, time.monotonic()))
    assert ep.dispatched_since_scrape == 1
    ep.took_snapshot(parse_vllm_metrics(BUSY, time.monotonic()))
    assert ep.dispatched_since_scrape == 1  # 5 in flight, 2 on the page: at most the 1 counted
    ep.in_flight = 2
    ep.took_snapshot(parse_vllm_metrics(BUSY, time.monotonic()))
    assert ep.dispatched_since_scrape == 0  # the page shows all of them


async def test_a_policy_whose_metrics_would_read_stale_between_scrapes_is_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    """``scoring.staleMetricsMs`` no longer than a scrape period makes load scoring put an
    average in for endpoints between two of their scrapes: said once per policy and value,
    naming the flag to change, at start and when a policy changes."""
    store = Datastore()
    store.replace([make_pool("local", count=1)], [make_policy("chat")])  # staleMetricsMs 3000
    assert MetricsScraper(store, interval_s=0.1).check_staleness() == []  # idle: 2 s
    (busy,) = MetricsScraper(store, interval_s=3.0).check_staleness()
    assert "default/chat" in busy and "--scrape-interval-ms (3000)" in busy
    (accounted,) = MetricsScraper(store, accounted_interval_s=3.0).check_staleness()
    assert "--accounted-scrape-interval-ms (3000)" in accounted
    assert "its accounted endpoints'" in accounted
    scraper = MetricsScraper(store, interval_s=0.3, idle_interval_s=4.5)
    caplog.clear()
    with caplog.at_level("WARNING", logger="kvroute_router.scrape.scraper"):
        await scraper.start()
        try:
            (idle,) = [r.getMessage() for r in caplog.records]
            assert "--idle-scrape-interval-ms (4500)" in idle and "staleMetricsMs (3000)" in idle
            assert "its idle endpoints'" in idle
            assert scraper.check_staleness() == []  # once
            store.set_policy(make_policy("chat", scoring={"staleMetricsMs": 6000}))
            store.set_policy(make_policy("chat", scoring={"staleMetricsMs": 3000}))
            assert len(caplog.records) == 2  # warned again after a value that was fine
        finally:
            await scraper.stop()


@pytest.mark.parametrize(("per_second", "most_pages_per_second"), [(0.47, 1.15), (0.2, 1.05)])
def test_thin_poisson_traffic_keeps_about_one_page_per_accounted_period(
        per_second: float, most_pages_per_second: float) -> None:
    """64 engines at 30 req/s send each ~0.47 requests a second, at random. Left at half a
    request per accounted period (round 51), two requests close together put the engine at a
    shorter period: 1.28 pages a second against the 1.0 of the accounted period (router-cpu.md
    rounds 28-29); at one request per period, 1.12. The pacer is fed a seeded Poisson stream,
    as the scrape loop feeds it, over 20,000 s of such traffic."""
    stream = random.Random(7)
    arrivals, t = [], 0.0
    while t < 20_000.0:
        t += stream.expovariate(per_second)
        arrivals.append(t)
    pacer = AccountedPacer(0.1, 1.0, 0, 0.0)
    now, pages = 0.0, 0
    while now < 20_000.0:
        pages += 1
        now += pacer.period(bisect.bisect_left(arrivals, now), now)
    assert pages / 20_000.0 <= most_pages_per_second


def test_a_busy_engine_is_soon_scraped_at_the_interval() -> None:
    """An engine that gets busy leaves the long period at its first page: at 9.4 requests a
    second (64 engines at 600 req/s) its third page comes within 1.5 s, and from 3 s on it is
    scraped every interval."""
    pacer, now, pages = AccountedPacer(0.1, 1.0, 0, 0.0), 0.0, []
    while now < 10.0:
        pages.append((now, pacer.period(int(now * 9.4), now)))
        now += pages[-1][1]
    assert pages[2][0] < 1.5
    assert {period for at, period in pages if at >= 3.0} == {0.1}
