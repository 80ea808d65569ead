"""The metrics scraper against a real HTTP server on loopback: a bad page (a non-finite or
non-numeric value, undecodable bytes) is counted, drops the endpoint's snapshot, and the
scrape loop keeps going — the next good page is read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web
from kvroute_router.datastore.store import Datastore
from kvroute_router.router_metrics import RouterMetrics
from kvroute_router.scrape.scraper import MetricsScraper
from kvroute_router.scrape.vllm_metrics import MetricsParseError, parse_vllm_metrics

from tests.aiohttp_server import serving
from tests.unit.router.router_fixtures import make_pool

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
