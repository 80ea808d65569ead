"""Replica coordination: every router replica tells the others what it dispatched, over Redis.

Active-active replicas each see every engine's KV events and scrape every engine, but a dispatch
is known only to the replica that made it until the engine publishes its blocks (after the
prefill) and the next scrape counts the request. In that window another replica sees no holder
for the prompt's blocks and no extra load, so a tenant's next request, sent through another
replica, lands elsewhere and prefills the same context again (measured in
docs/benchmarks/emulated-fleet.md: hits fell from 93 % to 65 % of the oracle with three
replicas).

:class:`ReplicaSync` closes the window. The director calls :meth:`ReplicaSync.on_dispatch` on
every attempt it sends; the record (pool, endpoint, the prompt's block hashes the sender's index
did not already show as held there) is queued without blocking the request and a sender task
publishes the queue in batches on one Redis pub/sub channel. A receiver task subscribed to the
channel applies every other replica's records as its own dispatch would be applied: the blocks
are marked pending on that endpoint in this replica's KV index (``pendingMs``, as for its own
dispatches), the blocks the sender found held there (the record's *held* blocks) are touched as
its own dispatch touches them, and with the engine's capacity the index forecasts the evictions
the dispatch causes (``engine.kvEvents.evictionForecast``) — so every replica's index keeps the
whole fleet's recency order, not its own share of it — and the endpoint's
``dispatched_since_scrape`` grows by one until its next scrape. A dispatch that makes its
endpoint compute a prefix the sender registered as in flight (``Endpoint.prefill_in_flight``:
the prefill wait, and on priority engines the priority floor) is registered in the receiver's
``prefill_in_flight`` too, with its vLLM priority, until the sender says it started answering or
ended (an *answered* record, :meth:`on_answering`) or the pending marks expire (``pendingMs``),
whichever is first: a follower routed by another replica then waits for that prefix and is
queued after it, as one routed by the same replica is. And the prompt tokens a dispatch leaves
the endpoint to compute (what it added to the sender's ``Endpoint.prefill_backlog``, the
``prefill-cost`` scorer's load) are added to the receiver's too, under the sender's dispatch id,
until the answered record or :data:`REMOTE_BACKLOG_TTL_S`: each replica weighs the fleet's
prefill queue, not a third of it. Every attempt's first byte is an answered record too (flag
*started*), which the receiver counts in the endpoint's ``answers_started``: the proxy's
per-try timeout tells a busy engine from a stuck one by it, and an engine answering only the
other replicas' requests is busy. The senders heard in the last :data:`PEER_WINDOW_S` are the
replica count (:meth:`ReplicaSync.replicas`), whose share of the room each replica's admission
queue lets go; and each replica reports the requests waiting in its admission queues (a
*waiting report*, whenever they change and every :data:`WAITING_REFRESH_S` while there are
any), so that each lets go only its own among the fleet's oldest
(:meth:`ReplicaSync.peers_waiting`).

Trust: the channel is written by router replicas only; Redis is the trusted hop (the operator's
own Redis, reachable by the routers alone — docs/security.md, "Replica sync"). Still, a record
is applied only to a pool and endpoint this replica knows, blocks only where its own index is
trustworthy, and a malformed message is dropped whole and counted — at worst a forged message
skews prefix scores (and which blocks the forecast hides), and can hold requests that reuse the
forged prefix in the prefill wait (``prefillWaitMs``) or queue them later, for at most
``pendingMs``, and can inflate an endpoint's prefill backlog (steering requests away from it)
for at most :data:`REMOTE_BACKLOG_TTL_S`, and forged first bytes keep a stream waiting at an
engine that answers nothing (the per-try timeout's "busy" rule) until its
``requestTimeoutSeconds``, and forged waiting reports make a replica's queue
defer to waiters that do not exist, for at most half the policy's ``queueTimeoutMs`` per
request; it reaches no budget, tenant or response. Redis down:
records are dropped (they are stale within a second anyway), the replicas route independently,
``kvroute_replica_sync_connected`` is 0, and the receiver reconnects with backoff; a prefix or
backlog another replica registered here is forgotten at its expiry (so is all a stopped replica
registered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from time import monotonic
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvroute_router.datastore.store import Datastore
from kvroute_router.director import Decision
from kvroute_router.framework.endpoint import Endpoint, PrefillInFlight
from kvroute_router.framework.registry import REPLICA_COUNT, ReplicaCount, SharedServices
from kvroute_router.framework.tasks import cancel_and_wait
from kvroute_router.kvevents.feed import services_key
from kvroute_router.kvevents.hub import PoolKVEvents
from kvroute_router.plugins.prefix_precise import STATE_HASHES, STATE_MATCH
from kvroute_router.replicasync.wire import (
    MAX_BLOCKS,
    MAX_MESSAGE_BYTES,
    MAX_RECORDS,
    MAX_WAITERS,
    SENDER_ID_BYTES,
    WAITING_MAGIC,
    DispatchRecord,
    WireError,
    decode,
    decode_waiting,
    encode,
    encode_waiting,
)

log = logging.getLogger(__name__)

DEFAULT_CHANNEL = "kvroute:replica-sync:v1"
MAX_QUEUED = 4096
"""Records waiting for the sender at most; beyond, the oldest are dropped (and counted)."""
PUBLISH_TIMEOUT_S = 2.0
RETRY_MAX_S = 5.0
_HEADER_BYTES = 4 + 1 + SENDER_ID_BYTES + 2
MAX_REMOTE_PREFILLS = 65536
"""Other replicas' in-flight prefixes registered here at most (each lives ``pendingMs`` at
most); beyond, new ones are not registered."""
MAX_REMOTE_BACKLOGS = 65536
"""Other replicas' dispatches counted in a prefill backlog here at most; beyond, new ones are
not counted (and this replica's own unanswered dispatches it remembers ids for)."""
REMOTE_BACKLOG_TTL_S = 30.0
"""How long another replica's dispatch stays in an endpoint's prefill backlog here without its
answered record (lost with a Redis outage, or its replica stopped): longer than any prefill
waits in a queue that is still serving, short enough that a lost record misleads the
``prefill-cost`` scorer only briefly."""
PEER_WINDOW_S = 10.0
"""Another replica counts as routing (:meth:`ReplicaSync.replicas`) while a message of its
arrived in the last this many seconds: an idle replica sends nothing, and a replica with no
traffic has no queue to share."""
MAX_REPLICAS = 64
""":meth:`ReplicaSync.replicas` says at most this many: a flood of forged sender ids (only
possible with write access to the trusted Redis) can shrink each replica's share of the room
to 1/64, never to nothing."""


WAITING_REFRESH_S = 1.0
"""A replica with waiters reports them again at least this often (a report that did not change
still says they wait)."""
WAITING_TTL_S = 3.0
"""Another replica's waiting report counts this long after it arrived: a replica that stopped
or lost Redis is not deferred to for longer."""


class ReplicaSyncMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent = Counter(
            "kvroute_replica_sync_sent_records_total",
            "Dispatch records this replica queued for the others, by outcome (published; "
            "dropped: the queue was full; failed: Redis did not take them).",
            ["result"], registry=registry)
        self.received = Counter(
            "kvroute_replica_sync_received_records_total",
            "Other replicas' dispatch records, by outcome (applied; unknown_pool / "
            "unknown_endpoint: not in this replica's datastore, ignored).",
            ["result"], registry=registry)
        self.rejected = Counter(
            "kvroute_replica_sync_rejected_messages_total",
            "Messages on the replica-sync channel that are not valid records (dropped whole).",
            registry=registry)
        self.marked = Counter(
            "kvroute_replica_sync_pending_blocks_total",
            "Blocks marked pending in this replica's KV index from other replicas' dispatches.",
            registry=registry)
        self.remote_prefills = Gauge(
            "kvroute_replica_sync_remote_prefills",
            "Prompt prefixes other replicas' requests are computing, registered here (their "
            "followers wait for them and, on priority engines, queue after them).",
            registry=registry)
        self.remote_backlog = Gauge(
            "kvroute_replica_sync_remote_backlog_tokens",
            "Prompt tokens other replicas' unanswered dispatches left the endpoints to compute, "
            "counted in this replica's prefill backlogs.",
            registry=registry)
        self.connected = Gauge(
            "kvroute_replica_sync_connected",
            "1 while this replica is subscribed to the replica-sync channel.",
            registry=registry)
        self.replicas = Gauge(
            "kvroute_replica_sync_replicas",
            "Router replicas routing now, this one included: those heard from on the channel "
            "in the last 10 s. Each releases this share of the room from its admission queue.",
            registry=registry)
        self.replicas.set(1)
        self.waiting_reports = Counter(
            "kvroute_replica_sync_waiting_reports_total",
            "Waiting reports (the requests in a replica's admission queues), by outcome "
            "(published, failed: Redis did not take it; received: another replica's).",
            ["result"], registry=registry)
        self.peer_waiting = Gauge(
            "kvroute_replica_sync_peer_waiting",
            "Requests the other replicas reported waiting in their admission queues (at most "
            "256 per policy each): this replica's queue lets go only its own among the oldest.",
            registry=registry)


class ReplicaSync:
    """Publishes this replica's dispatches and applies the other replicas'."""

    def __init__(self, client: Any, datastore: Datastore, services: SharedServices,
                 registry: CollectorRegistry, *, channel: str = DEFAULT_CHANNEL,
                 max_queued: int = MAX_QUEUED,
                 sender_id: bytes | None = None) -> None:
        self.client = client  # redis.asyncio.Redis
        self.datastore = datastore
        self.services = services
        services.put(REPLICA_COUNT, ReplicaCount(self.replicas))
        self.channel = channel
        self.metrics = ReplicaSyncMetrics(registry)
        self.sender_id = sender_id or os.urandom(SENDER_ID_BYTES)
        self._queue: deque[DispatchRecord] = deque()
        self._max_queued = max_queued
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._outage_logged = False
        self._remote: dict[tuple[str, str, int],
                           tuple[Endpoint, PrefillInFlight, asyncio.TimerHandle]] = {}
        """Other replicas' in-flight prefixes: (pool, endpoint, first block) -> what was
        registered in the endpoint's ``prefill_in_flight``, and its expiry."""
        self._remote_backlog: dict[tuple[bytes, int],
                                   tuple[Endpoint, int, asyncio.TimerHandle]] = {}
        """Other replicas' unanswered dispatches: (sender, dispatch id) -> the endpoint, the
        tokens added to its ``prefill_backlog``, and their expiry."""
        self._remote_tokens = 0
        self._dispatch_ids: dict[tuple[int, str], int] = {}
        """This replica's dispatches with a backlog: (id(decision), endpoint) -> dispatch id,
        until the attempt answers (:meth:`on_answering`)."""
        self._next_id = 0
        self._heard: dict[bytes, float] = {}
        """Other replicas by sender id -> when a message of theirs last arrived (monotonic)."""
        self.waiting: Callable[[int], Mapping[str, Sequence[tuple[int, int]]]] | None = None
        """This replica's admission queues' waiters by policy key (the budget hook's
        ``waiting``), reported to the others; None: nothing to report."""
        self._report_due = False
        self._reported_any = False  # the last report had waiters: refresh it
        self._peer_waiting: dict[bytes, tuple[float, dict[str, list[tuple[int, int]]]]] = {}
        """Other replicas' waiting reports by sender: (arrived, monotonic; waiters by policy)."""

    def replicas(self) -> int:
        """The router replicas routing now, this one included: 1 + the senders heard from in
        the last :data:`PEER_WINDOW_S` (at most :data:`MAX_REPLICAS`). Each replica's admission
        queue releases this share of the room it sees
        (:meth:`~kvroute_router.admission.controller.AdmissionController.release_room`)."""
        horizon = monotonic() - PEER_WINDOW_S
        for sender in [s for s, at in self._heard.items() if at < horizon]:
            del self._heard[sender]
        count = min(MAX_REPLICAS, 1 + len(self._heard))
        self.metrics.replicas.set(count)
        return count

    def peers_waiting(self, policy: str) -> list[tuple[int, int]]:
        """The other replicas' waiters for ``policy`` (order keys), from their reports of the
        last :data:`WAITING_TTL_S`."""
        horizon = monotonic() - WAITING_TTL_S
        keys: list[tuple[int, int]] = []
        for at, waiting in self._peer_waiting.values():
            if at >= horizon:
                keys += waiting.get(policy, ())
        return keys

    def on_waiting_changed(self) -> None:
        """An admission queue changed: report the waiters (the sender coalesces the changes of
        one turn of the event loop into one report; no I/O here)."""
        if self.waiting is not None:
            self._report_due = True
            self._wake.set()

    @classmethod
    def from_url(cls, url: str, datastore: Datastore, services: SharedServices,
                 registry: CollectorRegistry, **kwargs: Any) -> ReplicaSync:
        import redis.asyncio

        # Socket timeouts bound a black-holed Redis; the pub/sub reader polls with its own
        # timeout and the health check keeps an idle subscription honest.
        client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=2.0,
                                              socket_timeout=5.0, health_check_interval=15)
        return cls(client, datastore, services, registry, **kwargs)

    # ---- sending -----------------------------------------------------------------------------
    def on_dispatch(self, decision: Decision, endpoint: Endpoint) -> None:
        """Queue one dispatch for the other replicas (a director ``DispatchListener``; no I/O)."""
        blocks: tuple[int, ...] = ()
        touched: tuple[int, ...] = ()
        hashes = decision.state.read(STATE_HASHES, list)
        if hashes:
            matched = decision.state.read(STATE_MATCH, dict) or {}
            held = matched.get(endpoint.name, 0)
            blocks = tuple(hashes[held:held + MAX_BLOCKS])
            touched = tuple(hashes[max(0, held - MAX_BLOCKS):held])
        dispatch_id, tokens = None, 0
        backlog = decision.prefill_backlog.get(endpoint.name, 0.0)
        if backlog > 0:
            dispatch_id, tokens = self._next_id, math.ceil(backlog)
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF
            if len(self._dispatch_ids) >= MAX_REMOTE_BACKLOGS:  # an attempt never answered
                del self._dispatch_ids[next(iter(self._dispatch_ids))]
            self._dispatch_ids[(id(decision), endpoint.name)] = dispatch_id
        started = decision.prefill_started.get(endpoint.name)
        if started is not None and blocks and started[0] == blocks[0]:
            self._send(DispatchRecord(decision.pool.key, endpoint.name, blocks, computes=True,
                                      priority=started[1].priority, dispatch_id=dispatch_id,
                                      tokens=tokens, held=touched))
        else:
            self._send(DispatchRecord(decision.pool.key, endpoint.name, blocks,
                                      dispatch_id=dispatch_id, tokens=tokens, held=touched))

    def on_answering(self, decision: Decision, endpoint: Endpoint, first: int | None,
                     backlog: float, first_byte: bool) -> None:
        """The attempt started answering or ended: the other replicas take its tokens off the
        endpoint's prefill backlog and forget the prefix it registered (``first``), if any,
        and count its first byte (``first_byte``) as the endpoint answering (a director
        ``AnsweringListener``; no I/O)."""
        dispatch_id = self._dispatch_ids.pop((id(decision), endpoint.name), None)
        if dispatch_id is None and first is None and not first_byte:
            return
        self._send(DispatchRecord(decision.pool.key, endpoint.name,
                                  () if first is None else (first,), answered=True,
                                  dispatch_id=dispatch_id, started=first_byte))

    def _send(self, record: DispatchRecord) -> None:
        if len(self._queue) >= self._max_queued:
            self._queue.popleft()
            self.metrics.sent.labels("dropped").inc()
        self._queue.append(record)
        self._wake.set()

    def _take_batch(self) -> list[DispatchRecord]:
        batch: list[DispatchRecord] = []
        size = _HEADER_BYTES
        while self._queue and len(batch) < MAX_RECORDS:
            # Pool keys and endpoint names are API-validated DNS names: they always encode.
            record_size = self._queue[0].encoded_size()
            if batch and size + record_size > MAX_MESSAGE_BYTES:
                break
            batch.append(self._queue.popleft())
            size += record_size
        return batch

    async def _send_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WAITING_REFRESH_S if self._reported_any else None):
                    await self._wake.wait()
            self._wake.clear()
            if self._report_due or self._reported_any:
                await self._report_waiting()
            while self._queue:
                batch = self._take_batch()
                if not batch:
                    continue
                try:
                    payload = encode(self.sender_id, batch)
                except WireError as exc:  # a name over the limit: not a pool of ours
                    log.warning("replica sync: %d record(s) not sent: %s", len(batch), exc)
                    self.metrics.sent.labels("dropped").inc(len(batch))
                    continue
                try:
                    async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                        await self.client.publish(self.channel, payload)
                except Exception as exc:  # redis.RedisError, OSError, TimeoutError
                    # What is queued is stale within a second: drop it, wait, try new records.
                    failed = len(batch) + len(self._queue)
                    self._queue.clear()
                    self.metrics.sent.labels("failed").inc(failed)
                    self._outage(exc)
                    await asyncio.sleep(1.0)
                    break
                self.metrics.sent.labels("published").inc(len(batch))

    async def _report_waiting(self) -> None:
        """Publish this replica's waiters (an empty report once the queues have emptied)."""
        self._report_due = False
        if self.waiting is None:
            return
        waiting = self.waiting(MAX_WAITERS)
        try:
            payload = encode_waiting(self.sender_id, waiting)
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await self.client.publish(self.channel, payload)
        except WireError as exc:  # more policies with waiters than a report carries
            log.warning("replica sync: waiting report not sent: %s", exc)
            self.metrics.waiting_reports.labels("failed").inc()
            return
        except Exception as exc:  # redis.RedisError, OSError, TimeoutError
            self.metrics.waiting_reports.labels("failed").inc()
            self._outage(exc)
            return
        self._reported_any = bool(waiting)
        self.metrics.waiting_reports.labels("published").inc()

    # ---- receiving ---------------------------------------------------------------------------
    def receive(self, payload: object) -> None:
        """Apply one message from the channel (this replica's own are skipped)."""
        if not isinstance(payload, bytes):
            self.metrics.rejected.inc()
            return
        if payload[:len(WAITING_MAGIC)] == WAITING_MAGIC:
            self._receive_waiting(payload)
            return
        try:
            sender, records = decode(payload)
        except WireError as exc:
            self.metrics.rejected.inc()
            log.debug("replica sync: message dropped: %s", exc)
            return
        if sender == self.sender_id:
            return
        self._hear(sender)
        for record in records:
            self.metrics.received.labels(self.apply(record, sender)).inc()

    def _hear(self, sender: bytes) -> bool:
        """Another replica's message arrived: it counts as routing (False: one sender more
        than :data:`MAX_REPLICAS`, not counted); the gauge follows replicas joining and
        leaving."""
        heard = sender in self._heard or len(self._heard) < MAX_REPLICAS
        if heard:
            self._heard[sender] = monotonic()
        self.replicas()
        return heard

    def _receive_waiting(self, payload: bytes) -> None:
        try:
            sender, waiting = decode_waiting(payload)
        except WireError as exc:
            self.metrics.rejected.inc()
            log.debug("replica sync: waiting report dropped: %s", exc)
            return
        if sender == self.sender_id or not self._hear(sender):
            return  # as many senders as replicas are counted: a flood goes no further
        self.metrics.waiting_reports.labels("received").inc()
        if waiting:
            self._peer_waiting[sender] = (monotonic(), waiting)
        else:
            self._peer_waiting.pop(sender, None)
        self._prune_waiting()

    def _prune_waiting(self) -> None:
        horizon = monotonic() - WAITING_TTL_S
        for sender in [s for s, (at, _) in self._peer_waiting.items() if at < horizon]:
            del self._peer_waiting[sender]
        self.metrics.peer_waiting.set(sum(len(keys) for _, waiting in self._peer_waiting.values()
                                          for keys in waiting.values()))

    def apply(self, record: DispatchRecord, sender: bytes) -> str:
        """Apply another replica's (``sender``'s) dispatch as this replica's own would be; the
        outcome label."""
        state = self.datastore.pool(record.pool_key)
        if state is None:
            return "unknown_pool"
        endpoint = state.endpoints.get(record.endpoint)
        if endpoint is None:
            return "unknown_endpoint"
        if record.answered:
            if record.started:  # the engine answers: the per-try timer's "busy, not stuck"
                endpoint.answers_started += 1
            if record.blocks:
                self._prefill_ended(record.pool_key, record.endpoint, record.blocks[0])
            if record.dispatch_id is not None:
                self._backlog_ended(sender, record.dispatch_id)
            return "applied"
        if endpoint.metrics is not None:  # the next scrape counts it (and resets the count)
            endpoint.dispatched()
        if record.dispatch_id is not None:
            self._backlog_started(sender, record.dispatch_id, endpoint, record.tokens)
        if record.blocks or record.held:
            events = self.services.get(services_key(record.pool_key), PoolKVEvents)
            if events is not None and events.trustworthy(record.endpoint):
                # The held blocks first, in prompt order, as the sender's own dispatch passed
                # them: the index touches them and forecasts the evictions the dispatch causes
                # with this replica's view of the engine's capacity.
                events.mark_pending(record.endpoint, record.held + record.blocks,
                                    endpoint.kv_capacity_blocks, own=False)
                self.metrics.marked.inc(len(record.blocks))
                if record.computes and events.index.pending_ttl > 0:
                    self._prefill_started(record, endpoint, events.index.pending_ttl)
        return "applied"

    def _prefill_started(self, record: DispatchRecord, endpoint: Endpoint, ttl_s: float) -> None:
        """Register another replica's in-flight prefix, as its own dispatch did there, until
        its answered record or the pending marks' expiry (``ttl_s``)."""
        first = record.blocks[0]
        if first in endpoint.prefill_in_flight or len(self._remote) >= MAX_REMOTE_PREFILLS:
            return  # already computed by another attempt (this replica's or another's)
        key = (record.pool_key, record.endpoint, first)
        flight = PrefillInFlight(record.priority)
        endpoint.prefill_in_flight[first] = flight
        expiry = asyncio.get_running_loop().call_later(ttl_s, self._prefill_ended, *key)
        self._remote[key] = (endpoint, flight, expiry)
        self.metrics.remote_prefills.set(len(self._remote))

    def _prefill_ended(self, pool_key: str, endpoint_name: str, first: int) -> None:
        entry = self._remote.pop((pool_key, endpoint_name, first), None)
        if entry is None:
            return
        endpoint, flight, expiry = entry
        expiry.cancel()
        if endpoint.prefill_in_flight.get(first) is flight:
            del endpoint.prefill_in_flight[first]
        flight.done.set()  # its waiters go on
        self.metrics.remote_prefills.set(len(self._remote))

    def _backlog_started(self, sender: bytes, dispatch_id: int, endpoint: Endpoint,
                         tokens: int) -> None:
        """Count another replica's dispatch in ``endpoint``'s prefill backlog, as its own
        dispatch did there, until its answered record or :data:`REMOTE_BACKLOG_TTL_S`."""
        key = (sender, dispatch_id)
        if key in self._remote_backlog or len(self._remote_backlog) >= MAX_REMOTE_BACKLOGS:
            return
        endpoint.add_prefill_backlog(tokens)  # counted as arrival-ranked (round 44)
        expiry = asyncio.get_running_loop().call_later(REMOTE_BACKLOG_TTL_S,
                                                       self._backlog_ended, *key)
        self._remote_backlog[key] = (endpoint, tokens, expiry)
        self._remote_tokens += tokens
        self.metrics.remote_backlog.set(self._remote_tokens)

    def _backlog_ended(self, sender: bytes, dispatch_id: int) -> None:
        entry = self._remote_backlog.pop((sender, dispatch_id), None)
        if entry is None:
            return
        endpoint, tokens, expiry = entry
        expiry.cancel()
        endpoint.remove_prefill_backlog(tokens)
        self._remote_tokens -= tokens
        self.metrics.remote_backlog.set(self._remote_tokens)

    async def _receive_loop(self) -> None:
        delay = 0.25
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.metrics.connected.set(1)
                if self._outage_logged:
                    log.info("replica sync: subscribed to %s again", self.channel)
                    self._outage_logged = False
                delay = 0.25
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self.receive(message.get("data"))
                    else:  # a quiet second: replicas that stopped leave the count
                        self.replicas()
                        self._prune_waiting()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis.RedisError, OSError: Redis is away
                self.metrics.connected.set(0)
                self._outage(exc)
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _outage(self, exc: BaseException) -> None:
        if not self._outage_logged:
            log.warning("replica sync: Redis unavailable (%s: %s); replicas route "
                        "independently until it is back", type(exc).__name__, exc)
            self._outage_logged = True

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._send_loop(), name="replica-sync-send"),
                       asyncio.create_task(self._receive_loop(), name="replica-sync-receive")]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks, what="replica sync")
        self._tasks = []
        for key in list(self._remote):
            self._prefill_ended(*key)
        for sender, dispatch_id in list(self._remote_backlog):
            self._backlog_ended(sender, dispatch_id)
        self._peer_waiting.clear()
        self.metrics.peer_waiting.set(0)
        self.metrics.connected.set(0)
        with contextlib.suppress(Exception):
            await self.client.aclose()


__all__ = ["DEFAULT_CHANNEL", "REMOTE_BACKLOG_TTL_S", "ReplicaSync", "ReplicaSyncMetrics"]
