"""Replica coordination: every router replica tells the others what it dispatched, over Redis.

Active-active replicas each see every engine's KV events and scrape every engine, but a
dispatch is known only to the replica that made it until the engine publishes its blocks
(after the prefill) and the next scrape counts the request. In that window another replica
sees no holder for the prompt's blocks and no extra load, so a tenant's next request, sent
through another replica, lands elsewhere and prefills the same context again (measured in
docs/benchmarks/emulated-fleet.md: hits fell from 93 % to 65 % of the oracle with three
replicas).

:class:`ReplicaSync` closes the window. The director calls :meth:`ReplicaSync.on_dispatch` on
every attempt it sends; the record (pool, endpoint, the prompt's block hashes the sender's
index did not already show as held there) is queued without blocking the request and a sender
task publishes the queue in batches on one Redis pub/sub channel. A receiver task subscribed to
the channel applies every other replica's records as its own dispatch would be applied: the
blocks are marked pending on that endpoint in this replica's KV index (``pendingMs``, as for
its own dispatches), and the endpoint's ``dispatched_since_scrape`` grows by one until its next
scrape.

Trust: the channel is written by router replicas only; Redis is the trusted hop (the
operator's own Redis, reachable by the routers alone — docs/security.md, "Replica sync").
Still, a record is applied only to a pool and endpoint this replica knows, blocks only where
its own index is trustworthy, and a malformed message is dropped whole and counted — at worst
a forged message skews prefix scores for ``pendingMs``; it reaches no budget, tenant or
response. Redis down: records are dropped (they are stale within a second anyway), the
replicas route independently, ``kvroute_replica_sync_connected`` is 0, and the receiver
reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvroute_router.datastore.store import Datastore
from kvroute_router.director import Decision
from kvroute_router.framework.endpoint import Endpoint
from kvroute_router.framework.registry import SharedServices
from kvroute_router.framework.tasks import cancel_and_wait
from kvroute_router.kvevents.feed import services_key
from kvroute_router.kvevents.hub import PoolKVEvents
from kvroute_router.plugins.prefix_precise import STATE_HASHES, STATE_MATCH
from kvroute_router.replicasync.wire import (
    MAX_BLOCKS,
    MAX_MESSAGE_BYTES,
    MAX_RECORDS,
    SENDER_ID_BYTES,
    DispatchRecord,
    WireError,
    decode,
    encode,
)

log = logging.getLogger(__name__)

DEFAULT_CHANNEL = "kvroute:replica-sync:v1"
MAX_QUEUED = 4096
"""Records waiting for the sender at most; beyond, the oldest are dropped (and counted)."""
PUBLISH_TIMEOUT_S = 2.0
RETRY_MAX_S = 5.0
_HEADER_BYTES = 4 + 1 + SENDER_ID_BYTES + 2


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
        self.connected = Gauge(
            "kvroute_replica_sync_connected",
            "1 while this replica is subscribed to the replica-sync channel.",
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
        self.channel = channel
        self.metrics = ReplicaSyncMetrics(registry)
        self.sender_id = sender_id or os.urandom(SENDER_ID_BYTES)
        self._queue: deque[DispatchRecord] = deque()
        self._max_queued = max_queued
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._outage_logged = False

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
        hashes = decision.state.read(STATE_HASHES, list)
        if hashes:
            matched = decision.state.read(STATE_MATCH, dict) or {}
            held = matched.get(endpoint.name, 0)
            blocks = tuple(hashes[held:held + MAX_BLOCKS])
        if len(self._queue) >= self._max_queued:
            self._queue.popleft()
            self.metrics.sent.labels("dropped").inc()
        self._queue.append(DispatchRecord(decision.pool.key, endpoint.name, blocks))
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
            await self._wake.wait()
            self._wake.clear()
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

    # ---- receiving ---------------------------------------------------------------------------
    def receive(self, payload: object) -> None:
        """Apply one message from the channel (this replica's own are skipped)."""
        if not isinstance(payload, bytes):
            self.metrics.rejected.inc()
            return
        try:
            sender, records = decode(payload)
        except WireError as exc:
            self.metrics.rejected.inc()
            log.debug("replica sync: message dropped: %s", exc)
            return
        if sender == self.sender_id:
            return
        for record in records:
            self.metrics.received.labels(self.apply(record)).inc()

    def apply(self, record: DispatchRecord) -> str:
        """Apply another replica's dispatch as this replica's own would be; the outcome label."""
        state = self.datastore.pool(record.pool_key)
        if state is None:
            return "unknown_pool"
        endpoint = state.endpoints.get(record.endpoint)
        if endpoint is None:
            return "unknown_endpoint"
        if endpoint.metrics is not None:  # the next scrape counts it (and resets the count)
            endpoint.dispatched()
        if record.blocks:
            events = self.services.get(services_key(record.pool_key), PoolKVEvents)
            if events is not None and events.trustworthy(record.endpoint):
                events.mark_pending(record.endpoint, record.blocks)
                self.metrics.marked.inc(len(record.blocks))
        return "applied"

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
        self.metrics.connected.set(0)
        with contextlib.suppress(Exception):
            await self.client.aclose()


__all__ = ["DEFAULT_CHANNEL", "ReplicaSync", "ReplicaSyncMetrics"]
