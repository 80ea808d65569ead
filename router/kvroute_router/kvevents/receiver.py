"""Reading every engine's KV-event SUB socket in timed passes on the event loop.

A router replica follows every engine, so it receives the **fleet's** event batches (one per
engine step that stored or evicted blocks), whichever replica routed the requests. Read one
awaited ``recv_multipart`` at a time (pyzmq's asyncio sockets), each batch woke the event loop
for itself — a reader callback, a future, a task step, each engine's applier task — and that
cost ~165 µs of the loop's CPU per batch on the development VM before any decoding: at a few
thousand batches a second, most of a core (``docs/benchmarks/router-cpu.md``, round 15).
Here the sockets are plain, non-blocking ZMQ sockets read in **passes**:

* every socket's ``ZMQ_FD`` (readable while ZMQ has news for the socket) is registered with
  one private selector set (``epoll``; ``kqueue`` on macOS), so one system call tells which
  of many sockets have news;
* a **pass** asks the set which sockets have news (a select with no wait) and reads those with
  ``NOBLOCK`` until ZMQ says ``EAGAIN``, handing each message to its subscriber's ``deliver``;
* **idle**: the event loop watches the set's descriptor. News starts a pass at once if the last
  one was at least ``coalesce_s`` ago — a lone batch is applied as promptly as before, with one
  wake-up as before — else when that much has passed;
* **polling**: a pass that read more than one message (batches are coming fast) schedules the
  next ``coalesce_s`` later, with nothing watched meanwhile, instead of going idle. Every batch
  of every engine that arrives in between shares that one wake-up, and reaches the index at
  most ``coalesce_s`` later than it would otherwise — less than one engine step. A pass that
  reads one message or none goes back to idle.
* a pass yields once it has run ``slice_s`` (the loop is shared with the request path) and goes
  on at once in the next; one socket gives at most ``max_per_pass`` messages per pass, so a
  backlog (a reconnect, a burst) cannot starve the others.

``ZMQ_FD`` signals that ZMQ has commands for the socket, not that a message waits: a socket read
until ``EAGAIN`` has processed them (ZMQ does so before it answers ``EAGAIN`` to a non-blocking
read) and told its pipe that the reader sleeps, so the next message signals the descriptor
again; a socket left with messages (``max_per_pass``) is read in the next pass without a
signal. The set is level-triggered, so news that arrives while the receiver turns idle makes
its descriptor readable at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import zmq

logger = logging.getLogger("kvroute.kvevents.receiver")

Deliver = Callable[[list[bytes]], None]
"""Takes one message's frames; must not block (the subscriber applies or queues it)."""

DEFAULT_COALESCE_S = 0.005
DEFAULT_MAX_PER_PASS = 256
DEFAULT_SLICE_S = 0.01


@dataclass
class _Reader:
    socket: zmq.Socket[Any]
    fd: int
    deliver: Deliver


@dataclass
class ReceiverStats:
    """What the passes carried (tests, the benchmark)."""

    passes: int = 0
    messages: int = 0
    wakeups: int = 0
    """Times news ended an idle spell."""


class EventReceiver:
    """Timed read passes over many SUB sockets; lives on the loop that runs :meth:`attach`."""

    def __init__(self, *, coalesce_s: float = DEFAULT_COALESCE_S,
                 max_per_pass: int = DEFAULT_MAX_PER_PASS,
                 slice_s: float = DEFAULT_SLICE_S) -> None:
        self.coalesce_s = max(0.0, coalesce_s)
        self.max_per_pass = max(1, max_per_pass)
        self.slice_s = slice_s
        self.stats = ReceiverStats()
        self._readers: dict[int, _Reader] = {}  # by ZMQ_FD
        self._backlog: set[int] = set()
        """Sockets to read in the next pass without a signal: left with messages by the last
        (``max_per_pass``), or just attached."""
        self._set: selectors.BaseSelector | None = None
        self._watching = False
        self._polling = False
        self._last_pass = -math.inf
        self._read_this_pass = 0  # messages read by the pass in progress (over its slices)
        self._carry: list[int] = []  # sockets with news that a pass cut short left unread
        self._scheduled: asyncio.TimerHandle | asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def polling(self) -> bool:
        return self._polling

    def attach(self, socket: zmq.Socket[Any], deliver: Deliver) -> None:
        """Start reading ``socket`` (a plain, non-asyncio ZMQ socket) into ``deliver``."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("an EventReceiver serves one event loop")
        fd = int(socket.get(zmq.FD))
        if fd in self._readers:
            raise ValueError("socket already attached")
        if self._set is None:
            self._set = selectors.DefaultSelector()  # epoll on Linux, kqueue on macOS
        self._set.register(fd, selectors.EVENT_READ)
        # Read at once even without a signal: messages may wait already, and ZMQ_FD may
        # have signalled before it was registered.
        self._readers[fd] = _Reader(socket, fd, deliver)
        self._backlog.add(fd)
        if self._scheduled is None:
            self._defer(None)

    def detach(self, socket: zmq.Socket[Any]) -> None:
        """Stop reading ``socket`` (idempotent); call before closing it."""
        for fd, reader in list(self._readers.items()):
            if reader.socket is socket:
                del self._readers[fd]
                self._backlog.discard(fd)
                if self._set is not None:
                    with contextlib.suppress(KeyError, OSError):
                        self._set.unregister(fd)
        if not self._readers:
            self._stop()

    def attached(self) -> int:
        return len(self._readers)

    def _stop(self) -> None:
        """Nothing attached: no pass, no watch, no selector set."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        self._unwatch()
        self._polling = False
        self._carry = []
        if self._set is not None:
            self._set.close()
            self._set = None
        self._loop = None  # free to serve another loop (a router restarted in-process)

    # -- idle: the set's descriptor watched -------------------------------------------------
    def _set_fd(self) -> int:
        assert self._set is not None
        fileno = getattr(self._set, "fileno", None)
        if fileno is None:
            raise RuntimeError("this platform's selector has no descriptor of its own "
                               "(neither epoll nor kqueue)")
        return int(fileno())

    def _watch(self) -> None:
        assert self._loop is not None and self._set is not None
        if not self._watching:
            self._loop.add_reader(self._set_fd(), self._ready)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching and self._loop is not None and self._set is not None:
            self._loop.remove_reader(self._set_fd())
        self._watching = False

    def _ready(self) -> None:
        """The set's descriptor: news while idle."""
        if self._scheduled is not None:
            return  # a pass is coming (the descriptor is unwatched then; this is a stray)
        self.stats.wakeups += 1
        self._due()

    def _due(self) -> None:
        """A pass is due: now if the last was ``coalesce_s`` ago, else when it will be."""
        assert self._loop is not None
        when = self._last_pass + self.coalesce_s
        if when <= self._loop.time():
            self._pass()  # in this callback: a lone batch costs one wake-up, as before
        else:
            self._defer(when)

    def _defer(self, when: float | None) -> None:
        """The next pass at ``when`` (None: as soon as the loop has run the others)."""
        assert self._loop is not None
        self._polling = True
        self._unwatch()  # level-triggered: it would fire until the pass reads the sockets
        if self._scheduled is not None:
            self._scheduled.cancel()
        self._scheduled = (self._loop.call_soon(self._pass) if when is None
                           else self._loop.call_at(when, self._pass))

    # -- polling: timed passes -------------------------------------------------------------
    def _pass(self) -> None:
        assert self._loop is not None
        self._scheduled = None
        if self._set is None or not self._readers:
            self._polling = False
            return
        self.stats.passes += 1
        started = time.perf_counter()
        if not self._carry:
            self._last_pass = self._loop.time()
            self._read_this_pass = 0
        due = self._carry
        due.extend(key.fd for key, _ in self._set.select(0))
        due.extend(self._backlog)
        self._carry = []
        done: set[int] = set()
        for position, fd in enumerate(due):
            reader = self._readers.get(fd)
            if reader is None or fd in done:
                continue  # detached (perhaps by a delivery of this pass), or read already
            done.add(fd)
            before = self.stats.messages
            if self._read(reader) == "more":
                self._backlog.add(fd)
            else:
                self._backlog.discard(fd)
            self._read_this_pass += self.stats.messages - before
            if self._set is None:
                return  # a delivery detached the last socket: nothing left to read or watch
            if time.perf_counter() - started >= self.slice_s and position + 1 < len(due):
                self._carry = [f for f in due[position + 1:] if f not in done]
                self._defer(None)  # yield to the loop, then go on
                return
        if not self._readers:
            self._stop()  # a delivery detached the last socket, or none was due
            return
        if self._read_this_pass > 1 or self._backlog:
            # Batches are coming fast: the next pass reads what arrives meanwhile, together.
            self._defer(self._last_pass + self.coalesce_s)
            return
        self._polling = False
        self._watch()

    def _read(self, reader: _Reader) -> Literal["empty", "more", "broken"]:
        """Deliver up to ``max_per_pass`` messages."""
        socket, deliver = reader.socket, reader.deliver
        for _ in range(self.max_per_pass):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return "empty"
            except zmq.ZMQError as error:
                logger.debug("kv-events socket read failed: %s", error)
                return "broken"
            self.stats.messages += 1
            try:
                deliver(frames)
            except Exception:
                logger.exception("kv-events delivery failed; message dropped")
            if self._readers.get(reader.fd) is not reader:
                return "broken"  # the delivery detached it: not one more message
        return "more"
