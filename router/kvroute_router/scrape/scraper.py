"""Scrapes every endpoint's ``/metrics`` on a fixed interval (default 100 ms), one asyncio task
per endpoint, and swaps the parsed snapshot into the :class:`Endpoint`.

A failed or timed-out scrape counts toward ``scrape_failures`` (the healthy filter drops an
endpoint after 3 in a row); the old snapshot stays and ages, so scorers see it as stale after
the policy's ``staleMetricsMs`` and fall back to averages. Scrape tasks follow the datastore:
they start when endpoints appear and stop when they leave.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from kvroute_router.datastore.store import Datastore
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.tasks import cancel_and_wait
from kvroute_router.scrape.vllm_metrics import parse_vllm_metrics

log = logging.getLogger(__name__)


class MetricsScraper:
    """Scrape loops for all endpoints of a datastore."""

    def __init__(self, datastore: Datastore, interval_s: float = 0.1,
                 timeout_s: float | None = None) -> None:
        self.datastore = datastore
        self.interval_s = interval_s
        self.timeout_s = timeout_s if timeout_s is not None else max(0.5, 5 * interval_s)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._started = False

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._started = True
        self.datastore.add_listener(self._on_change)
        self._on_change(self.datastore.endpoints(), [])

    async def stop(self) -> None:
        self._started = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(tasks, what="metrics scraper")
        if self._session is not None:
            await self._session.close()

    def _on_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        if not self._started:
            return
        for ep in removed:
            task = self._tasks.pop(id(ep), None)
            if task is not None:
                task.cancel()
        for ep in added:
            if id(ep) not in self._tasks:
                self._tasks[id(ep)] = asyncio.get_running_loop().create_task(
                    self._loop(ep), name=f"scrape {ep.address}")

    async def scrape_once(self, ep: Endpoint) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(f"{ep.url}/metrics") as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, resp.history, status=resp.status)
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ep.scrape_failures += 1
            if ep.scrape_failures in (1, 3):
                log.info("scrape of %s failed (%d in a row): %s", ep.address,
                         ep.scrape_failures, exc)
            return False
        ep.metrics = parse_vllm_metrics(text, time.monotonic())
        ep.dispatched_since_scrape = 0
        if ep.scrape_failures >= 3:
            log.info("scrape of %s succeeds again", ep.address)
        ep.scrape_failures = 0
        return True

    async def _loop(self, ep: Endpoint) -> None:
        while True:
            started = time.monotonic()
            ok = await self.scrape_once(ep)
            # Back off on an endpoint that keeps failing (up to 2 s), not on a healthy one.
            pause = self.interval_s if ok else min(2.0, self.interval_s * (1 + ep.scrape_failures))
            await asyncio.sleep(max(0.0, pause - (time.monotonic() - started)))
