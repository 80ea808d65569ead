"""The KV-event receiver against real ZMQ PUB/SUB sockets on loopback.

It reads many SUB sockets in timed passes (``kvevents/receiver.py``): these tests check that
nothing is lost or reordered (bursts, lone messages after an idle spell, backlogs larger than
one pass may read), that one pass serves many sockets, that a backlog cannot starve the other
sockets or hold the loop, and that detaching leaves nothing watched. Every wait has a deadline;
no assertion is on timing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import zmq
from kvroute_router.kvevents.receiver import EventReceiver

from .test_subscriber import eventually, free_port

PROBE = 10**9


class Link:
    """One PUB bound on loopback and a plain SUB connected to it (every topic)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        port = free_port()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.bind(f"tcp://127.0.0.1:{port}")
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(f"tcp://127.0.0.1:{port}")
        self.got: list[int] = []

    def deliver(self, frames: list[bytes]) -> None:
        self.got.append(int.from_bytes(frames[1], "big"))

    def send(self, number: int) -> None:
        self.pub.send_multipart([b"t", number.to_bytes(8, "big")])

    def close(self) -> None:
        self.pub.close(linger=0)
        self.sub.close(linger=0)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
async def links(ctx: zmq.Context[zmq.Socket[bytes]]) -> AsyncIterator[list[Link]]:
    made: list[Link] = []
    yield made
    for link in made:
        link.close()


async def joined(receiver: EventReceiver, link: Link) -> None:
    """Attach, then send probes until one arrives (a SUB misses what is sent before it has
    joined: ZMQ's slow joiner); ``got`` starts empty after."""
    receiver.attach(link.sub, link.deliver)
    deadline = time.monotonic() + 15.0
    while not link.got:
        if time.monotonic() > deadline:
            raise AssertionError("the SUB never joined")
        link.send(PROBE)
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)  # the rest of the probes
    link.got.clear()


async def test_bursts_on_many_sockets_arrive_whole_in_order_and_share_passes(
        ctx: zmq.Context[zmq.Socket[bytes]], links: list[Link]) -> None:
    receiver = EventReceiver(coalesce_s=0.02)
    links.extend(Link(ctx) for _ in range(8))
    for link in links:
        await joined(receiver, link)
    passes = receiver.stats.passes
    for number in range(50):
        for link in links:
            link.send(number)
    await eventually(lambda: all(len(link.got) == 50 for link in links), "every message")
    assert all(link.got == list(range(50)) for link in links)
    # 400 messages on 8 sockets: one wake-up served many of them (one per message before).
    assert receiver.stats.passes - passes < 400 // 4
    for link in links:
        receiver.detach(link.sub)


async def test_a_lone_message_after_an_idle_spell_is_not_missed(
        ctx: zmq.Context[zmq.Socket[bytes]], links: list[Link]) -> None:
    """The receiver goes idle between messages (its descriptor watched, no pass due), every
    time: each lone message must wake it."""
    receiver = EventReceiver(coalesce_s=0.001)
    links.extend(Link(ctx) for _ in range(3))
    for link in links:
        await joined(receiver, link)
    for number in range(30):
        await eventually(lambda: not receiver.polling, "the receiver idle")
        link = links[number % len(links)]
        link.send(number)
        await eventually(lambda link=link, number=number: number in link.got,  # type: ignore[misc]
                         f"message {number}")
    assert receiver.stats.wakeups >= 30
    for link in links:
        receiver.detach(link.sub)


async def test_a_backlog_is_read_over_several_passes_without_starving_other_sockets(
        ctx: zmq.Context[zmq.Socket[bytes]], links: list[Link]) -> None:
    receiver = EventReceiver(coalesce_s=0.01, max_per_pass=4)
    busy, quiet = Link(ctx), Link(ctx)
    links.extend([busy, quiet])
    await joined(receiver, busy)
    await joined(receiver, quiet)
    for number in range(200):
        busy.send(number)
    await eventually(lambda: len(busy.got) >= 4, "the first pass over the backlog")
    quiet.send(7)
    await eventually(lambda: quiet.got == [7], "the quiet socket's message")
    assert len(busy.got) < 200, "the quiet socket waited for the whole backlog"
    await eventually(lambda: len(busy.got) == 200, "the whole backlog")
    assert busy.got == list(range(200))
    receiver.detach(busy.sub)
    receiver.detach(quiet.sub)


async def test_a_long_pass_yields_to_the_loop(
        ctx: zmq.Context[zmq.Socket[bytes]], links: list[Link]) -> None:
    """Deliveries that take long (a big batch each) are cut into slices: other callbacks run
    before the pass has read every socket."""
    receiver = EventReceiver(coalesce_s=0.01, slice_s=0.005)
    links.extend(Link(ctx) for _ in range(6))
    for link in links:
        await joined(receiver, link)
    order: list[str] = []

    def slow(link: Link) -> Callable[[list[bytes]], None]:
        def deliver(frames: list[bytes]) -> None:
            time.sleep(0.004)
            order.append("delivered")
            link.deliver(frames)
        return deliver

    for link in links:
        receiver.detach(link.sub)
        receiver.attach(link.sub, slow(link))
    await eventually(lambda: not receiver.polling, "the receiver idle")
    order.clear()
    stop = False

    async def ticker() -> None:
        while not stop:
            if not order or order[-1] != "tick":
                order.append("tick")
            await asyncio.sleep(0)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    for link in links:
        link.send(1)
    # Hold the loop: every message reaches its socket before the first pass.
    time.sleep(0.2)  # noqa: ASYNC251
    await eventually(lambda: all(link.got == [1] for link in links), "every message")
    stop = True
    await tick
    deliveries = [i for i, what in enumerate(order) if what == "delivered"]
    assert any(what == "tick" for what in order[deliveries[0]:deliveries[-1]]), order
    for link in links:
        receiver.detach(link.sub)


async def test_detach_stops_reading_and_releases_everything(
        ctx: zmq.Context[zmq.Socket[bytes]], links: list[Link]) -> None:
    receiver = EventReceiver(coalesce_s=0.005)
    first, second = Link(ctx), Link(ctx)
    links.extend([first, second])
    await joined(receiver, first)
    await joined(receiver, second)
    receiver.detach(first.sub)
    receiver.detach(first.sub)  # idempotent
    first.send(1)
    second.send(2)
    await eventually(lambda: second.got == [2], "the attached socket's message")
    await asyncio.sleep(0.05)
    assert first.got == []
    receiver.detach(second.sub)
    assert receiver.attached() == 0 and not receiver.polling
    second.send(3)
    await asyncio.sleep(0.05)
    assert second.got == [2]
    # Attaching again after everything was detached starts afresh.
    await joined(receiver, first)
    first.send(4)
    await eventually(lambda: first.got == [4], "a message after re-attaching")
    receiver.detach(first.sub)


async def test_a_delivery_that_raises_loses_only_its_message(
        ctx: zmq.Context[zmq.Socket[bytes]], links: list[Link]) -> None:
    receiver = EventReceiver(coalesce_s=0.005)
    link = Link(ctx)
    links.append(link)
    await joined(receiver, link)

    def fussy(frames: list[bytes]) -> None:
        if int.from_bytes(frames[1], "big") == 2:
            raise RuntimeError("cannot take this one")
        link.deliver(frames)

    receiver.detach(link.sub)
    receiver.attach(link.sub, fussy)
    for number in range(5):
        link.send(number)
    await eventually(lambda: link.got == [0, 1, 3, 4], "the other messages")
    receiver.detach(link.sub)


async def test_a_delivery_may_detach_the_last_socket(
        ctx: zmq.Context[zmq.Socket[bytes]], links: list[Link]) -> None:
    """A subscriber stopping while its message is delivered: the pass ends cleanly, nothing
    stays watched, and the receiver serves the next socket attached."""
    receiver = EventReceiver(coalesce_s=0.005, slice_s=0.0)
    first, second = Link(ctx), Link(ctx)
    links.extend([first, second])
    await joined(receiver, first)

    def leave(frames: list[bytes]) -> None:
        if int.from_bytes(frames[1], "big") == PROBE:
            return  # a late probe of joined()
        first.deliver(frames)
        receiver.detach(first.sub)

    receiver.detach(first.sub)
    receiver.attach(first.sub, leave)
    for number in range(3):
        first.send(number)
    await eventually(lambda: first.got == [0], "the message that detached its socket")
    assert receiver.attached() == 0 and not receiver.polling
    await joined(receiver, second)
    second.send(5)
    await eventually(lambda: second.got == [5], "the next socket's message")
    receiver.detach(second.sub)
