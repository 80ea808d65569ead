"""Waiting reports: what one replica says waits in its admission queues reaches the others
exactly, replaces what it said before, lapses when it goes quiet, and a broken report is
rejected whole with a reason; the sender reports every change, and again while anything waits."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvroute_router.datastore.store import Datastore
from kvroute_router.framework.registry import SharedServices
from kvroute_router.replicasync import sync as sync_module
from kvroute_router.replicasync.sync import ReplicaSync
from kvroute_router.replicasync.wire import (
    MAX_WAITERS,
    WireError,
    decode_waiting,
    encode_waiting,
)
from prometheus_client import CollectorRegistry

A = b"A" * 16
keys = st.tuples(st.integers(-2**63, 2**63 - 1), st.integers(0, 2**64 - 1))
reports = st.dictionaries(st.text(min_size=1, max_size=30),
                          st.lists(keys, min_size=1, max_size=MAX_WAITERS), max_size=5)


@given(reports)
def test_a_report_decodes_to_what_was_encoded(waiting: dict[str, list[tuple[int, int]]]) -> None:
    assert decode_waiting(encode_waiting(A, waiting)) == (A, waiting)


@given(reports.filter(bool))
def test_every_truncation_of_a_report_is_rejected(waiting: dict[str, list[tuple[int, int]]]
                                                  ) -> None:
    payload = encode_waiting(A, waiting)
    for end in range(len(payload)):
        with pytest.raises(WireError):
            decode_waiting(payload[:end])


def test_broken_reports_are_named() -> None:
    good = encode_waiting(A, {"ns/chat": [(0, 5)]})
    cases = {
        good[:4] + b"\x02" + good[5:]: "version 2",
        good + b"\x00": "trailing bytes",
        encode_waiting(A, {"ns/chat": [(0, 5)]})[:-18] + b"\x00\x00": "0 waiters",
    }
    for payload, reason in cases.items():
        with pytest.raises(WireError, match=reason):
            decode_waiting(payload)
    twice = good[:21] + b"\x00\x02" + good[23:] + good[23:]
    with pytest.raises(WireError, match="twice"):
        decode_waiting(twice)
    assert len(decode_waiting(encode_waiting(
        A, {"ns/chat": [(0, k) for k in range(MAX_WAITERS + 9)]}))[1]["ns/chat"]) == MAX_WAITERS


def _replica() -> tuple[ReplicaSync, CollectorRegistry]:
    registry = CollectorRegistry()
    return ReplicaSync(None, Datastore(), SharedServices(), registry), registry


def test_another_replicas_waiters_count_until_replaced_or_quiet(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A report replaces the sender's previous one (an empty one: nothing waits there), this
    replica's own echo is not a peer's, and a report lapses WAITING_TTL_S after it arrived
    (a replica that stopped is not waited for)."""
    sync, registry = _replica()
    now = [500.0]
    monkeypatch.setattr(sync_module, "monotonic", lambda: now[0])
    sync.receive(encode_waiting(A, {"ns/chat": [(0, 10), (0, 11)], "ns/code": [(-1, 3)]}))
    sync.receive(encode_waiting(sync.sender_id, {"ns/chat": [(0, 1)]}))
    assert sync.peers_waiting("ns/chat") == [(0, 10), (0, 11)]
    assert sync.peers_waiting("ns/other") == []
    assert registry.get_sample_value("kvroute_replica_sync_peer_waiting") == 3
    assert sync.replicas() == 2
    sync.receive(encode_waiting(A, {"ns/chat": [(0, 11)]}))
    assert sync.peers_waiting("ns/chat") == [(0, 11)] and sync.peers_waiting("ns/code") == []
    now[0] += sync_module.WAITING_TTL_S + 0.1
    assert sync.peers_waiting("ns/chat") == []
    sync.receive(encode_waiting(A, {"ns/chat": [(0, 12)]}))
    sync.receive(encode_waiting(A, {}))
    assert sync.peers_waiting("ns/chat") == []
    sync.receive(encode_waiting(A, {"ns/chat": [(0, 12)]})[:-1])
    assert registry.get_sample_value("kvroute_replica_sync_rejected_messages_total") == 1


class Capture:
    """Takes what the sender publishes (the loopback suite runs the same over real Redis)."""

    def __init__(self) -> None:
        self.published: list[bytes] = []

    async def publish(self, channel: str, payload: bytes) -> None:
        self.published.append(payload)

    async def aclose(self) -> None:
        pass


async def test_the_sender_reports_each_change_and_again_while_anything_waits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_module, "WAITING_REFRESH_S", 0.05)
    sync, registry = _replica()
    client = Capture()
    sync.client = client
    queue: dict[str, list[tuple[int, int]]] = {"ns/chat": [(0, 7)]}
    sync.waiting = lambda limit: {k: v[:limit] for k, v in queue.items() if v}
    task = asyncio.create_task(sync._send_loop())
    try:
        sync.on_waiting_changed()
        sync.on_waiting_changed()  # one turn of the loop: one report
        await asyncio.sleep(0.01)
        assert [decode_waiting(p)[1] for p in client.published] == [{"ns/chat": [(0, 7)]}]
        await asyncio.sleep(0.12)  # still waiting: said again
        assert len(client.published) >= 2
        queue["ns/chat"] = []
        sync.on_waiting_changed()
        await asyncio.sleep(0.01)
        assert decode_waiting(client.published[-1])[1] == {}
        count = len(client.published)
        await asyncio.sleep(0.12)  # nothing waits: nothing more to say
        assert len(client.published) == count
        assert registry.get_sample_value("kvroute_replica_sync_waiting_reports_total",
                                         {"result": "published"}) == count
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
