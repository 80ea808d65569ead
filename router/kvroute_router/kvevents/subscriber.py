"""One KV-event subscriber per engine: ZMQ SUB → bounded queue → prefix index, with replay.

Per connection, all on the router's event loop:

* the **receiver** (:class:`~.receiver.EventReceiver`, shared by a pool's subscribers) reads
  ``[topic, seq, payload]`` from a plain, non-blocking SUB socket (every topic) in drain passes
  that serve every engine with news, and the subscriber puts each on a bounded queue with
  ``put_nowait``; when the queue is full the batch is dropped and a resync is flagged — the loop
  never waits on a slow consumer, and the replay recovers the batch;
* the **monitor** watches the socket's connect/disconnect events: a disconnect makes the
  endpoint's index untrusted (the scorer falls back), a reconnect triggers a resync;
* the **applier** decodes batches (:mod:`.events`) and applies them to the
  :class:`~.index.PrefixIndex` in sequence order, runs the hash self-check on a sample, and
  resynchronises when needed.

Sequence rules: ``seq == last + 1`` applies (``seq == 0`` when no batch is applied yet and the
replay found none: a fresh or restarted engine numbers from 0, so its seq 1 arriving first means
seq 0 was lost); a gap (``seq > last + 1``) asks the engine's replay
socket (a DEALER sending ``[b"", start_seq]``, reading until ``seq == -1``) for what was missed;
``seq <= last`` with the payload we already applied is a duplicate; ``seq <= last`` with other
content means the engine restarted (vLLM's sequence starts again at 0): the endpoint's blocks are
dropped and rebuilt from the replay. A resync asks for the replay from the last applied ``seq``:
if the engine's batch at that ``seq`` differs from ours (or it has none), the engine is not the
one we followed — restart — and the index for that endpoint is rebuilt from ``seq`` 0 (as much
as the engine's replay buffer still holds; ``status.complete_history`` says whether that was
everything). ``AllBlocksCleared`` drops the endpoint's blocks too.

Nothing is ever stepped over: while a resync is due and its replay has failed (timeout, then a
backoff) no live batch is applied (``synced`` stays false; the replay brings them, from the last
batch applied); a replay answer with a hole is applied up to the hole and asked again (a ROUTER
drops what exceeds its high-water mark, silently), and so is one that ends before the live batch
that revealed the gap; a batch missing from ``MAX_HOLE_RETRIES + 1``
answers is taken as lost at the engine and counted. An idle subscriber asks what follows its last
batch every ``tail_check_s``: a lost *last* batch has no successor to reveal the gap.

ZMQ reconnects on its own, with exponential backoff between ``reconnect_ivl_ms`` and
``reconnect_ivl_max_ms``; if a session fails on an exception the subscriber starts a new one
after a backoff of its own. Service loops run until :meth:`KVEventSubscriber.stop`; every inner
loop (replay reading) is bounded in count and time, and so is every await on a shutdown path:
the session's tasks are cancelled with :func:`~kvroute_router.framework.tasks.cancel_and_wait`,
and a subscriber whose task does not end in time has its sockets closed by :meth:`abandon`.
**The event loop is shared with the request path**, so no task here runs on it for more than
about ``SLICE_S`` at a time: applying a batch costs ~0.4 ms (decode, index, self-check) and a
replay can carry ``max_replay_batches`` (20k) of them, so the replay reader, the replay apply
and the live apply loop all yield to the loop every ``SLICE_S`` (awaiting a ZMQ receive or a
queue that already holds an item does not yield). A message frame larger than
``max_message_bytes`` (ZMQ ``MAXMSGSIZE``; 8 MiB by default, ~1.5M tokens of ``BlockStored``
in one batch) makes ZMQ drop the connection: the endpoint is untrusted and resynchronised on
reconnect, and one batch cannot hold the loop for long.

No loop waits with ``asyncio.wait_for``: on Python 3.11 it can swallow a cancellation that
arrives as the awaited item does, which left a closing subscriber polling forever (issue 12);
``asyncio.timeout`` does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvroute_router.framework.tasks import cancel_and_wait
from kvroute_router.kvevents.events import (
    END_OF_REPLAY_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventDecodeError,
    decode_batch,
    decode_seq,
    event_hashes,
    indexable,
)
from kvroute_router.kvevents.hashing import BlockHasher
from kvroute_router.kvevents.index import PrefixIndex
from kvroute_router.kvevents.metrics import KVEventMetrics
from kvroute_router.kvevents.receiver import DEFAULT_COALESCE_S, EventReceiver
from kvroute_router.kvevents.selfcheck import BlockHashSelfCheck, HashCheckStatus
from kvroute_router.router_metrics import Children

logger = logging.getLogger("kvroute.kvevents.subscriber")

RECENT_DIGESTS = 4096
MAX_HOLE_RETRIES = 2
"""Replays asked again for a batch missing from a replay answer before it is taken as lost at
the source (counted as ``replays_total{outcome="hole"}``) and stepped over."""
SLICE_S = 0.01
"""Longest stretch a subscriber task runs on the event loop before yielding."""


class _Slicer:
    """Yields to the event loop once ``SLICE_S`` has passed since the last yield."""

    def __init__(self) -> None:
        self._since = time.perf_counter()

    async def pause(self) -> None:
        if time.perf_counter() - self._since >= SLICE_S:
            await asyncio.sleep(0)
            self._since = time.perf_counter()


@dataclass(frozen=True)
class KVEventSource:
    """Where one engine publishes: the index names its blocks after ``endpoint``."""

    endpoint: str
    events_endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    """ZMQ subscription prefix. ``""`` takes every topic the engine's PUB socket sends — one
    socket is one engine (one data-parallel rank), so there is nothing to filter: vLLM's
    default topic is ``""``, the operator's engines publish under ``kv@<pod>``, a user's may
    use any other."""


@dataclass(frozen=True)
class SubscriberSettings:
    """Tunables shared by every subscriber of a router."""

    queue_size: int = 4096
    replay_timeout_s: float = 5.0
    replay_backoff_s: float = 0.5
    replay_backoff_max_s: float = 5.0
    """After a failed replay the next one waits this long (doubling up to the max): batches
    that cannot be applied in sequence meanwhile are left to it, and a dead replay socket
    does not stall the apply loop for ``replay_timeout_s`` per batch."""
    max_replay_batches: int = 20_000
    reconnect_ivl_ms: int = 100
    reconnect_ivl_max_ms: int = 5_000
    session_backoff_s: float = 0.5
    session_backoff_max_s: float = 10.0
    idle_poll_s: float = 0.2
    """How often an applier with a resync due retries it (after a failed replay, while its
    backoff runs). Otherwise nothing polls: an idle applier sleeps until a batch, a flagged
    resync, :meth:`KVEventSubscriber.stop` or its next tail check wakes it."""
    tail_check_s: float = 5.0
    """After this long without a batch, ask the replay socket what follows the last one: a lost
    *last* batch is otherwise found only when the engine publishes again. 0 turns it off."""
    self_check_sample_every: int = 16
    receive_coalesce_s: float = DEFAULT_COALESCE_S
    """The receiver's drain passes are at least this far apart: an event reaches the index up
    to this much later, and every batch (of every engine) that arrives meanwhile shares one
    wake-up of the loop (:mod:`.receiver`)."""
    max_message_bytes: int = 8 * 1024 * 1024
    """ZMQ ``MAXMSGSIZE`` of the SUB and replay sockets: a larger frame drops the connection."""


@dataclass
class SubscriberStatus:
    """The state of one endpoint's event stream, for the scorer and for operators."""

    endpoint: str
    connected: bool = False
    synced: bool = False
    complete_history: bool = False
    last_seq: int | None = None
    last_batch_unix: float | None = None
    last_batch_monotonic: float | None = None
    batches_applied: int = 0
    gaps: int = 0
    replays: int = 0
    tail_checks: int = 0
    restarts: int = 0
    dropped: int = 0
    disconnected_since: float | None = None
    hash_check: HashCheckStatus = field(default_factory=HashCheckStatus)

    @property
    def trustworthy(self) -> bool:
        """Connected, in sequence, and its hashes reproduce: the index is right for it."""
        return self.connected and self.synced and self.hash_check.state != "mismatch"

    def as_dict(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint, "connected": self.connected, "synced": self.synced,
            "trustworthy": self.trustworthy, "complete_history": self.complete_history,
            "last_seq": self.last_seq, "last_batch_unix": self.last_batch_unix,
            "batches_applied": self.batches_applied, "gaps": self.gaps, "replays": self.replays,
            "tail_checks": self.tail_checks,
            "restarts": self.restarts, "dropped": self.dropped,
            "hash_check": self.hash_check.as_dict(),
        }


def _digest(payload: bytes) -> int:
    return zlib.crc32(payload)


class KVEventSubscriber:
    """Follows one engine's KV events into the shared prefix index."""

    def __init__(self, source: KVEventSource, index: PrefixIndex, hasher: BlockHasher | None,
                 metrics: KVEventMetrics, *, context: zmq.asyncio.Context | None = None,
                 settings: SubscriberSettings | None = None,
                 receiver: EventReceiver | None = None) -> None:
        self.source = source
        self.index = index
        self.metrics = metrics
        # the series every batch touches, looked up without labels()
        self._received, self._decoded = (Children(metrics.messages_received),
                                         Children(metrics.events_decoded))
        self._duplicates = Children(metrics.duplicate_blocks)
        self._event_age, self._blocks = (Children(metrics.last_event_age),
                                         Children(metrics.index_blocks))
        self.settings = settings or SubscriberSettings()
        self._context = context or zmq.asyncio.Context.instance()
        # The SUB socket is a plain one on the same ZMQ context: the receiver reads it without
        # pyzmq's asyncio machinery (a future and a wake-up per batch).
        self._plain_context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(
            self._context.underlying)
        self._receiver = receiver or EventReceiver(coalesce_s=self.settings.receive_coalesce_s)
        self.self_check = (BlockHashSelfCheck(source.endpoint, hasher,
                                              sample_every=self.settings.self_check_sample_every)
                           if hasher is not None else None)
        self.status = SubscriberStatus(endpoint=source.endpoint)
        if self.self_check is not None:
            self.status.hash_check = self.self_check.status
        self._queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(self.settings.queue_size)
        self._recent: OrderedDict[int, int] = OrderedDict()
        self._resync_needed = True
        self._hole: tuple[int, int] | None = None  # (missing seq, answers seen without it)
        self._last_activity = time.monotonic()
        self._replay_not_before = 0.0
        self._replay_backoff = self.settings.replay_backoff_s
        self._stopping = False
        self._ever_connected = False
        self._sockets: set[zmq.Socket[Any]] = set()
        self._parked = False
        """The applier waits on its empty queue (not in a resync or a replay)."""
        self._park_timer: asyncio.Timeout | None = None
        """The deadline of the applier's wait while it is parked: :meth:`_wake` moves it to
        now."""
        self._stop_requested = asyncio.Event()
        index.add_endpoint(source.endpoint)

    # -- lifecycle -------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask every loop to end; the owner then cancels :meth:`run` (bounded)."""
        self._stopping = True
        self._stop_requested.set()
        self._wake()

    def abandon(self) -> None:
        """Last resort when :meth:`run` did not end after cancellation: close every socket it
        holds, so nothing stays connected to the engine and no pending receive keeps it alive."""
        self._stopping = True
        self._stop_requested.set()
        for socket in list(self._sockets):
            self._close_socket(socket)

    def _open_socket(self, kind: int) -> zmq.asyncio.Socket:
        socket = self._context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        self._sockets.add(socket)
        return socket

    def _open_plain_socket(self, kind: int) -> zmq.Socket[bytes]:
        socket = self._plain_context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        self._sockets.add(socket)
        return socket

    def _close_socket(self, socket: zmq.Socket[Any]) -> None:
        self._receiver.detach(socket)
        self._sockets.discard(socket)
        with contextlib.suppress(zmq.ZMQError):
            socket.close(linger=0)

    def sizes(self) -> dict[str, int]:
        """Entries held for this engine (``kvroute_internal_entries``)."""
        return {"kv_recent_digests": len(self._recent), "kv_queued_batches": self._queue.qsize(),
                "kv_selfcheck_digests": (self.self_check.known_count()
                                         if self.self_check is not None else 0)}

    async def run(self) -> None:
        """Follow the engine until :meth:`stop` or cancellation, restarting failed sessions."""
        backoff = self.settings.session_backoff_s
        while not self._stopping:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("kv-events session for %s failed; retrying in %.1fs",
                                 self.source.endpoint, backoff)
            self.status.connected = False
            self.status.synced = False
            self._resync_needed = True
            if self._stopping:
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.settings.session_backoff_max_s)

    async def _session(self) -> None:
        sub = self._open_plain_socket(zmq.SUB)
        sub.setsockopt(zmq.RECONNECT_IVL, self.settings.reconnect_ivl_ms)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, self.settings.reconnect_ivl_max_ms)
        sub.setsockopt(zmq.SUBSCRIBE, self.source.topic.encode("utf-8"))
        sub.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
        monitor = zmq.asyncio.Socket.from_socket(
            sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED))
        self._sockets.add(monitor)
        sub.connect(self.source.events_endpoint)
        self._receiver.attach(sub, self._deliver)
        tasks = [asyncio.create_task(self._watch(monitor)),
                 asyncio.create_task(self._apply_loop())]
        # Waits for a task to end or for stop(), without a timer: an idle session costs nothing.
        stopped = asyncio.create_task(self._stop_requested.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task in done:
                    task.result()  # re-raise a failed task: the session restarts
                    raise RuntimeError("a kv-events task ended unexpectedly")
        finally:
            try:
                await cancel_and_wait([*tasks, stopped],
                                      what=f"kv-events session of {self.source.endpoint}")
            finally:
                with contextlib.suppress(zmq.ZMQError):
                    sub.disable_monitor()
                self._close_socket(monitor)
                self._close_socket(sub)

    # -- tasks -----------------------------------------------------------------------------
    def _deliver(self, frames: list[bytes]) -> None:
        """One live message from the receiver, never waited on: applied at once when it is the
        next in sequence and the applier is idle (nothing queued, no resync due or running),
        else queued for the applier."""
        if self._stopping:
            return
        if len(frames) != 3:
            self._drop("undecodable")
            return
        try:
            seq = decode_seq(frames[1])
        except EventDecodeError:
            self._drop("undecodable")
            return
        if seq < 0:
            # vLLM numbers batches from 0; -1 only ends a replay answer. Taken as a batch, a
            # negative seq made a held endpoint look restarted (its blocks dropped) or, as the
            # first batch, became the start of every later replay request, which cannot be
            # encoded: the session failed and restarted from it for good.
            self._drop("undecodable")
            return
        last = self.status.last_seq
        if (self._parked and last is not None and seq == last + 1 and not self._resync_needed
                and self._queue.empty()):
            # What _accept would do with it, without waking the applier's task for it.
            self._last_activity = time.monotonic()
            try:
                self._apply(seq, payload=frames[2], path="live")
            except Exception:
                logger.exception("kv-events batch %d of %s failed to apply; resynchronising",
                                 seq, self.source.endpoint)
                self._resync_needed = True
                self.status.synced = False
                self._wake()
            return
        try:
            self._queue.put_nowait((seq, frames[2]))
        except asyncio.QueueFull:
            self._drop("queue_full")
            self._resync_needed = True
            logger.warning("kv-events queue of %s full; batch %d dropped, will replay",
                           self.source.endpoint, seq)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while not self._stopping:
            message = parse_monitor_message(await monitor.recv_multipart())
            event = message["event"]
            if event == zmq.EVENT_CONNECTED:
                self.status.connected = True
                self.status.disconnected_since = None
                self.metrics.reconnects.labels(self.source.endpoint).inc()
                if self._ever_connected:
                    # Missed batches, or a different engine behind the address: find out.
                    self._resync_needed = True
                    self.status.synced = False
                self._ever_connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.status.connected = False
                self.status.disconnected_since = time.monotonic()
                self.status.synced = False
                self._resync_needed = True
            self._wake()  # a resync is due, or a tail check now can (or cannot) run

    async def _apply_loop(self) -> None:
        slicer = _Slicer()
        while not self._stopping:
            await slicer.pause()  # a backlog in the queue must not hold the loop
            try:
                # A drain pass often queues several batches: take them without a timer each.
                seq, payload = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                self._parked = True  # the receiver may apply the next batch itself meanwhile
                try:
                    async with asyncio.timeout_at(self._park_deadline()) as timer:
                        self._park_timer = timer
                        seq, payload = await self._queue.get()
                except TimeoutError:
                    self._parked = False  # before any await: a replay is no idle applier
                    self._park_timer = None
                    if self._resync_needed and self.status.connected:
                        await self._resync()
                    elif self._tail_check_due():
                        await self._resync(tail=True)
                    continue
                finally:
                    self._parked = False
                    self._park_timer = None
            self._last_activity = time.monotonic()
            if self._resync_needed:
                await self._resync()
            await self._accept(seq, payload)

    def _park_deadline(self) -> float | None:
        """When a parked applier wakes on its own (loop time), or ``None``: not until a batch
        or :meth:`_wake`. A resync that is due is retried every ``idle_poll_s`` while
        connected (its replay failed and backs off); a disconnected engine's reconnect wakes the
        applier; else the next tail check is the only deadline. Sixteen engines' appliers
        polling five times a second cost an idle router ~10 ms of CPU a second."""
        now = asyncio.get_running_loop().time()
        if self._resync_needed:
            return now + self.settings.idle_poll_s if self.status.connected else None
        every = self.settings.tail_check_s
        if every > 0 and self.status.connected and self.source.replay_endpoint is not None:
            return now + max(0.0, every - (time.monotonic() - self._last_activity))
        return None

    def _wake(self) -> None:
        """Make a parked applier look at its state now (a resync flagged, a reconnect, stop)."""
        if self._park_timer is not None:
            self._park_timer.reschedule(asyncio.get_running_loop().time())

    def _tail_check_due(self) -> bool:
        every = self.settings.tail_check_s
        return (every > 0 and self.status.connected and self.source.replay_endpoint is not None
                and time.monotonic() - self._last_activity >= every)

    # -- sequence handling -----------------------------------------------------------------
    async def _accept(self, seq: int, payload: bytes) -> None:
        last = self.status.last_seq
        if self._resync_needed and self.source.replay_endpoint is not None:
            # A resync is due (first connect, reconnect, restart, overflow) and the replay for
            # it failed or waits out its backoff. Applying this batch would move the point the
            # replay starts from past what it is for: the batches before it (never asked for
            # again), or the engine's batch at our last seq (what tells a restarted engine
            # behind the same address). The replay brings this batch too.
            return
        if last is not None and seq <= last:
            if self._recent.get(seq) == _digest(payload):
                self.metrics.events_dropped.labels(self.source.endpoint, "duplicate").inc()
                return
            self._engine_restarted(f"sequence went back from {last} to {seq}")
            await self._resync()
            return
        # Nothing applied yet after a replay came back empty (a fresh or restarted engine that
        # had published nothing): its first batch is seq 0, so a later one reveals a gap too.
        # Without a replay socket there is no such answer, and the first batch seen is where
        # following the engine starts.
        expected = (last + 1 if last is not None
                    else 0 if self.source.replay_endpoint is not None else seq)
        if seq > expected:
            self.status.gaps += 1
            self.metrics.gaps.labels(self.source.endpoint).inc()
            self.status.synced = False  # the index misses batches until the replay brings them
            if not await self._resync(reach=seq):
                # The replay failed, stopped at a hole or ended before this batch. Applying
                # this batch now would step over the missing ones for good: the next replay
                # starts after the last batch applied. Leave it to that replay, which starts
                # before them and brings this batch too.
                return
            applied = self.status.last_seq
            if applied is not None and seq <= applied:
                return  # the replay brought it
        self._apply(seq, payload, "live")

    def _engine_restarted(self, reason: str) -> None:
        endpoint = self.source.endpoint
        logger.warning("kv-events: engine %s restarted (%s); dropping its blocks", endpoint,
                       reason)
        self.status.restarts += 1
        self.metrics.restarts.labels(endpoint).inc()
        self._clear("restart")
        self.status.last_seq = None
        self._recent.clear()
        self._hole = None

    def _clear(self, reason: str) -> None:
        endpoint = self.source.endpoint
        self.index.clear(endpoint)
        self.metrics.cleared.labels(endpoint, reason).inc()
        self.metrics.index_blocks.labels(endpoint).set(0)

    async def _resync(self, *, tail: bool = False, reach: int | None = None) -> bool:
        """Bring the index in line with the engine through its replay socket.

        True when every batch the engine still holds up to the end of its answer is applied;
        False when the replay failed, its answer had a hole, or it ended before ``reach - 1``
        (``_resync_needed`` is then set: the next try starts from the last batch applied).
        ``tail``: a periodic check of an idle engine (finds a lost last batch). ``reach``: the
        live batch that revealed a gap — the engine published it, so the answer must come up
        to it."""
        self._resync_needed = False
        self._last_activity = time.monotonic()
        endpoint = self.source.endpoint
        if self.source.replay_endpoint is None:
            self.metrics.replays.labels(endpoint, "unavailable").inc()
            self.status.synced = True
            return True
        if time.monotonic() < self._replay_not_before:
            self._resync_needed = True
            self.status.synced = False
            return False
        last = self.status.last_seq
        batches = await self._replay(last if last is not None else 0, tail=tail)
        self._last_activity = time.monotonic()
        if batches is None:
            self._resync_needed = True
            self.status.synced = False
            return False
        if last is not None:
            first = batches[0] if batches else None
            if first is not None and first[0] == last and \
                    self._recent.get(last) == _digest(first[1]):
                batches = batches[1:]
            else:
                if first is not None and first[0] > last:
                    self.metrics.replays.labels(endpoint, "history_lost").inc()
                    self._clear("history_lost")
                    self.status.last_seq = None
                    self._recent.clear()
                else:
                    self._engine_restarted("replay disagrees with the batches applied")
                replayed = await self._replay(0)
                if replayed is None:
                    self._resync_needed = True
                    self.status.synced = False
                    return False
                batches = replayed
        if self.status.last_seq is None:
            self.status.complete_history = not batches or batches[0][0] == 0
        if tail and any(last is None or seq > last for seq, _ in batches):
            # The engine published after our last batch and we never saw it: a trailing gap.
            self.status.gaps += 1
            self.metrics.gaps.labels(endpoint).inc()
        slicer = _Slicer()
        for seq, payload in batches:
            applied = self.status.last_seq
            if applied is not None and seq <= applied:
                continue
            if applied is not None and seq > applied + 1 and not self._step_over(applied + 1):
                # A hole in the answer (a ROUTER socket drops what exceeds its high-water
                # mark, silently): what follows it waits for the next replay.
                self._resync_needed = True
                self.status.synced = False
                return False
            self._apply(seq, payload, "replay")
            await slicer.pause()
        applied = self.status.last_seq
        if reach is not None and applied is not None and reach > applied + 1:
            # The answer ended before the live batch (its tail lost on the way, or cut at
            # max_replay_batches). Unlike a hole inside an answer (_step_over) this has no
            # retry bound: a short answer still applied what it held, so each retry moves
            # last_seq on; an answer that keeps ending at the same batch is not a loss a
            # ROUTER socket makes.
            self._resync_needed = True
            self.status.synced = False
            return False
        # A disconnect or a dropped live batch during the replay asks for another one.
        self.status.synced = not self._resync_needed
        return True

    def _step_over(self, missing: int) -> bool:
        """A replay answer lacks batch ``missing``: ask again (False), up to
        ``MAX_HOLE_RETRIES`` times; then take it as lost at the source (True)."""
        endpoint = self.source.endpoint
        seen = self._hole[1] + 1 if self._hole is not None and self._hole[0] == missing else 1
        if seen <= MAX_HOLE_RETRIES:
            self._hole = (missing, seen)
            self.metrics.replays.labels(endpoint, "incomplete").inc()
            logger.info("kv-events replay from %s lacks batch %d; asking again", endpoint,
                        missing)
            return False
        self._hole = None
        self.metrics.replays.labels(endpoint, "hole").inc()
        logger.warning("kv-events: batch %d of %s is in none of %d replay answers; taken as "
                       "lost at the engine", missing, endpoint, seen)
        return True

    async def _replay(self, start_seq: int, *, tail: bool = False
                      ) -> list[tuple[int, bytes]] | None:
        """Batches with ``seq >= start_seq`` still in the engine's buffer; None on timeout.

        An answer is ``[topic, seq, payload]`` (vLLM 0.32, checked on a running engine; the
        emulator) or ``[seq, payload]`` (vLLM's ``ZmqEventPublisher`` in other versions), after
        the empty delimiter; both are read, and both end with ``seq == -1``."""
        assert self.source.replay_endpoint is not None
        endpoint = self.source.endpoint
        if tail:
            self.status.tail_checks += 1
        else:
            self.status.replays += 1
        dealer = self._open_socket(zmq.DEALER)
        dealer.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
        dealer.connect(self.source.replay_endpoint)
        batches: list[tuple[int, bytes]] = []
        slicer = _Slicer()
        try:
            # One deadline over the request and every reply (the send too: a DEALER can block).
            async with asyncio.timeout(self.settings.replay_timeout_s):
                await dealer.send_multipart([b"", start_seq.to_bytes(8, "big")])
                for _ in range(self.settings.max_replay_batches + 1):
                    await slicer.pause()
                    frames = await dealer.recv_multipart()
                    if frames and frames[0] == b"":
                        frames = frames[1:]
                    if len(frames) not in (2, 3):
                        continue
                    try:
                        seq = decode_seq(frames[-2])
                    except EventDecodeError:
                        self._drop("undecodable")
                        continue
                    if seq == END_OF_REPLAY_SEQ:
                        break
                    if seq < 0:  # not a batch of any engine (see _deliver)
                        self._drop("undecodable")
                        continue
                    batches.append((seq, frames[-1]))
        except TimeoutError:
            self.metrics.replays.labels(endpoint, "timeout").inc()
            logger.warning("kv-events replay from %s (seq >= %d) timed out; next try in %.1fs",
                           endpoint, start_seq, self._replay_backoff)
            self._replay_not_before = time.monotonic() + self._replay_backoff
            self._replay_backoff = min(self._replay_backoff * 2,
                                       self.settings.replay_backoff_max_s)
            return None
        finally:
            self._close_socket(dealer)
        self._replay_backoff = self.settings.replay_backoff_s
        self.metrics.replays.labels(endpoint, "tail_check" if tail else "ok").inc()
        return batches

    # -- applying --------------------------------------------------------------------------
    def _drop(self, reason: str) -> None:
        self.status.dropped += 1
        self.metrics.events_dropped.labels(self.source.endpoint, reason).inc()

    def _apply(self, seq: int, payload: bytes, path: str) -> None:
        endpoint = self.source.endpoint
        metrics = self.metrics
        self._received(endpoint, path).inc()
        self.status.last_seq = seq
        self._recent[seq] = _digest(payload)
        while len(self._recent) > RECENT_DIGESTS:
            self._recent.popitem(last=False)
        try:
            batch = decode_batch(seq, payload)
        except EventDecodeError:
            self._drop("undecodable")
            return
        if batch.unknown_events:
            metrics.events_dropped.labels(endpoint, "unknown_type").inc(batch.unknown_events)
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._decoded(endpoint, "BlockStored").inc()
                if not indexable(event):
                    metrics.events_dropped.labels(endpoint, "other_medium").inc()
                    continue
                hashes = event_hashes(event.block_hashes)
                new = self.index.store(endpoint, hashes)
                if new < len(hashes):
                    self._duplicates(endpoint, "BlockStored").inc(
                        len(hashes) - new)
                if self.self_check is not None:
                    self._self_check(event)
            elif isinstance(event, BlockRemoved):
                self._decoded(endpoint, "BlockRemoved").inc()
                if not indexable(event):
                    metrics.events_dropped.labels(endpoint, "other_medium").inc()
                    continue
                hashes = event_hashes(event.block_hashes)
                gone = self.index.remove(endpoint, hashes)
                if gone < len(hashes):
                    self._duplicates(endpoint, "BlockRemoved").inc(
                        len(hashes) - gone)
            elif isinstance(event, AllBlocksCleared):
                self._decoded(endpoint, "AllBlocksCleared").inc()
                self._clear("all_blocks_cleared")
        self.status.batches_applied += 1
        self.status.last_batch_unix = batch.ts
        self.status.last_batch_monotonic = time.monotonic()
        self._event_age(endpoint).set(batch.ts)
        self._blocks(endpoint).set(self.index.block_count(endpoint))
        metrics.index_distinct_blocks.set(self.index.distinct_blocks())

    def _self_check(self, event: BlockStored) -> None:
        assert self.self_check is not None
        result = self.self_check.check(event)
        if result == "skipped":
            return
        self.metrics.hash_checks.labels(self.source.endpoint, result).inc()
        if result == "mismatch":
            self.metrics.hash_mismatches.labels(self.source.endpoint).inc()
