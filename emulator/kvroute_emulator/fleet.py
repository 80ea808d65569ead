"""N emulated engines in one process (one event loop), and the admin endpoint for faults.

Every engine listens on its own loopback HTTP port and binds its own ZMQ PUB and replay ports,
as N separate vLLM servers would. :meth:`EmulatedFleet.endpoints` lists them in the form
``kvroute bench --attach`` reads (``url``, ``kv_events_endpoint``, ``replay_endpoint``,
``model_dir``).

Admin API (``admin_port``; JSON bodies; errors are 400/404 with an OpenAI-style body naming
``param``):

* ``GET /engines`` — every engine's address and state (running, waiting, steps, ``lag_s``:
  how far behind real time the process fell, in emulated seconds).
* ``POST /engines/{i}/kill`` — requests in flight are cut, the HTTP port refuses connections,
  KV events stop. ``POST /engines/{i}/restart`` — back on the same ports, empty cache, KV-event
  sequence from 0 (also after a kill).
* ``POST /engines/{i}/stall`` (``{"seconds": s}`` optional) and ``/resume`` — no steps run;
  HTTP still answers, requests wait. ``POST /engines/{i}/slow`` ``{"factor": f}`` — steps take
  ``f`` times as long (1 restores).
* ``POST /engines/{i}/metrics`` ``{"delay_s": d}`` — ``/metrics`` answers only after ``d``
  wall seconds (0 restores): an API server too busy to answer its metrics page while it still
  serves requests; a router's scrapes time out.
* ``POST /engines/{i}/events`` ``{"drop": p, "garble": p}`` — shares of KV-event batches the
  publisher drops (sequence numbers still advance; replay still has them) or garbles.
* ``GET /timings`` — ``{x-request-id: [arrived, first token written]}`` (``time.monotonic()``
  seconds) of the streamed requests that carried an ``x-request-id`` since the last call
  (:class:`~kvroute_emulator.server.RequestTimings`; ``bench/router_cpu.py`` reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from aiohttp import web

from kvroute_emulator.engine import EmulatedEngine
from kvroute_emulator.kvevents import KVEventPublisher
from kvroute_emulator.model.engine import (
    DEFAULT_KV_ALLOCATION,
    KV_ALLOCATIONS,
    SCHEDULING_POLICIES,
)
from kvroute_emulator.model.profile import CostProfile
from kvroute_emulator.server import ClientError, EngineServer, RequestTimings
from kvroute_emulator.tokens import ServedModel


@dataclass
class FleetConfig:
    """What a fleet emulates."""

    count: int
    profile: CostProfile
    model_dir: Path
    served_model_name: str
    time_scale: float = 1.0
    max_model_len: int = 4096
    host: str = "127.0.0.1"
    admin_port: int = 0
    eos_after: int = 0
    scheduling_policy: str = "fcfs"  # vLLM's --scheduling-policy: fcfs or priority
    kv_allocation: str = DEFAULT_KV_ALLOCATION  # the engine model's: on-demand or reserve

    def check(self) -> None:
        if self.count < 1:
            raise ValueError("count must be at least 1")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be {' or '.join(SCHEDULING_POLICIES)}, "
                             f"got {self.scheduling_policy!r}")
        if self.kv_allocation not in KV_ALLOCATIONS:
            raise ValueError(f"kv_allocation must be {' or '.join(KV_ALLOCATIONS)}, "
                             f"got {self.kv_allocation!r}")
        if self.time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        capacity = self.profile.kv_blocks * self.profile.block_size
        if capacity < self.max_model_len:
            raise ValueError(
                f"the profile's KV cache holds {capacity} tokens, less than max_model_len "
                f"{self.max_model_len}: lower max_model_len or raise kv_blocks (vLLM refuses "
                "to start in that case too)")


@dataclass
class _Slot:
    engine: EmulatedEngine
    server: EngineServer
    runner: web.AppRunner
    port: int
    pub_port: int = 0
    replay_port: int = 0
    site: web.TCPSite | None = None
    resume_task: asyncio.Task[None] | None = None


@dataclass
class EmulatedFleet:
    """The engines and the admin app; :meth:`start` and :meth:`stop` on one event loop."""

    config: FleetConfig
    slots: list[_Slot] = field(default_factory=list)
    admin_port: int = 0
    _ctx: zmq.asyncio.Context | None = None
    _admin_runner: web.AppRunner | None = None
    timings: RequestTimings = field(default_factory=RequestTimings)

    async def start(self) -> None:
        self.config.check()
        self._ctx = zmq.asyncio.Context()
        model = ServedModel.load(self.config.model_dir, self.config.served_model_name,
                                 self.config.max_model_len)
        for index in range(self.config.count):
            await self._start_engine(index, model)
        admin = web.Application(middlewares=[_admin_errors])
        admin.router.add_get("/engines", self._list)
        admin.router.add_get("/timings", self._timings)
        admin.router.add_post("/engines/{index}/{action}", self._act)
        self._admin_runner = web.AppRunner(admin, access_log=None)
        await self._admin_runner.setup()
        site = web.TCPSite(self._admin_runner, self.config.host, self.config.admin_port)
        await site.start()
        self.admin_port = _bound_port(site)

    async def _start_engine(self, index: int, model: ServedModel) -> None:
        ctx = self._ctx
        assert ctx is not None
        holder: dict[str, _Slot] = {}

        def publisher() -> KVEventPublisher:
            slot = holder.get("slot")
            pub = KVEventPublisher(ctx, self.config.host,
                                   slot.pub_port if slot else 0,
                                   slot.replay_port if slot else 0, seed=index)
            return pub

        engine = EmulatedEngine(index, self.config.profile, model, self.config.time_scale,
                                publisher, scheduling_policy=self.config.scheduling_policy,
                                kv_allocation=self.config.kv_allocation)
        server = EngineServer(engine, self.config.eos_after, self.timings)
        runner = web.AppRunner(server.app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, 0)
        await site.start()
        slot = _Slot(engine=engine, server=server, runner=runner, port=_bound_port(site),
                     site=site)
        assert engine.publisher is not None
        slot.pub_port = _endpoint_port(engine.publisher.endpoint)
        slot.replay_port = _endpoint_port(engine.publisher.replay_endpoint)
        holder["slot"] = slot
        engine.start()
        self.slots.append(slot)

    @staticmethod
    async def _close_site(slot: _Slot) -> None:
        site, slot.site = slot.site, None
        if site is not None:
            await site.stop()

    async def stop(self) -> None:
        for slot in self.slots:
            if slot.resume_task is not None:
                slot.resume_task.cancel()
            await slot.engine.stop()
            await slot.runner.cleanup()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)  # closes any socket left open, never blocks
            self._ctx = None

    def endpoints(self) -> list[dict[str, Any]]:
        host = self.config.host
        return [{"name": f"engine-{i}", "url": f"http://{host}:{s.port}",
                 "kv_events_endpoint": f"tcp://{host}:{s.pub_port}",
                 "replay_endpoint": f"tcp://{host}:{s.replay_port}",
                 "model_dir": str(self.config.model_dir)}
                for i, s in enumerate(self.slots)]

    # --- admin ---------------------------------------------------------------------------

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response([{**e, **s.engine.status()}
                                  for e, s in zip(self.endpoints(), self.slots, strict=True)])

    async def _timings(self, request: web.Request) -> web.Response:
        return web.json_response(self.timings.take())

    async def _act(self, request: web.Request) -> web.Response:
        try:
            index = int(request.match_info["index"])
            slot = self.slots[index]
        except (ValueError, IndexError):
            raise ClientError(f"no engine {request.match_info['index']!r}; there are "
                              f"{len(self.slots)} (0-{len(self.slots) - 1})", "index",
                              404, "NotFoundError") from None
        body: dict[str, Any] = {}
        if request.can_read_body:
            try:
                parsed = await request.json()
            except ValueError:
                raise ClientError("the body is not valid JSON", "body") from None
            if not isinstance(parsed, dict):
                raise ClientError("the body must be a JSON object", "body")
            body = parsed
        action = request.match_info["action"]
        engine = slot.engine
        if action == "kill":
            if engine.alive:
                await engine.kill()
            await self._close_site(slot)
        elif action == "restart":
            if engine.alive:
                await engine.kill()
            await self._close_site(slot)
            await engine.restart()
            if slot.site is None:
                slot.site = web.TCPSite(slot.runner, self.config.host, slot.port)
                await slot.site.start()
        elif action == "stall":
            seconds = _number(body, "seconds", None)
            engine.stall()
            if slot.resume_task is not None:
                slot.resume_task.cancel()
            if seconds is not None:
                slot.resume_task = asyncio.get_running_loop().create_task(
                    _resume_later(engine, seconds))
        elif action == "resume":
            engine.resume()
        elif action == "slow":
            factor = _number(body, "factor", None)
            if factor is None or factor <= 0:
                raise ClientError("factor must be a number > 0", "factor")
            engine.slow_down(factor)
        elif action == "metrics":
            delay = _number(body, "delay_s", None)
            if delay is None or not 0 <= delay <= 600:
                raise ClientError("delay_s must be a number of seconds in [0, 600]", "delay_s")
            engine.metrics_delay_s = float(delay)
        elif action == "events":
            drop = _number(body, "drop", 0.0)
            garble = _number(body, "garble", 0.0)
            for name, value in (("drop", drop), ("garble", garble)):
                if value is None or not 0 <= value <= 1:
                    raise ClientError(f"{name} must be a share in [0, 1]", name)
            if engine.publisher is not None:
                engine.publisher.drop_share = float(drop or 0.0)
                engine.publisher.garble_share = float(garble or 0.0)
        else:
            raise ClientError(f"unknown action {action!r}; valid: kill, restart, stall, "
                              "resume, slow, metrics, events", "action", 404, "NotFoundError")
        return web.json_response({**self.endpoints()[index], **engine.status()})


async def _resume_later(engine: EmulatedEngine, seconds: float) -> None:
    await asyncio.sleep(seconds)
    engine.resume()


def _number(body: dict[str, Any], name: str, default: float | None) -> float | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ClientError(f"{name} must be a number, got {value!r}", name)
    if value < 0:
        raise ClientError(f"{name} must not be negative", name)
    return float(value)


@web.middleware
async def _admin_errors(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
    try:
        return await handler(request)
    except ClientError as exc:
        return exc.response()


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp keeps the listening server here
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1])


def _endpoint_port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


@contextlib.contextmanager
def fleet_in_thread(config: FleetConfig) -> Iterator[EmulatedFleet]:
    """Run a fleet on an event loop in a background thread (tests, benchmarks); stops it on
    exit. The fleet's objects belong to that loop: talk to it over HTTP/ZMQ only."""
    loop = asyncio.new_event_loop()
    fleet = EmulatedFleet(config)
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(fleet.start())
        except BaseException as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(fleet.stop())
        loop.close()

    thread = threading.Thread(target=run, name="kvroute-emulator", daemon=True)
    thread.start()
    started.wait(timeout=120)
    if failure:
        raise failure[0]
    try:
        yield fleet
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=60)
