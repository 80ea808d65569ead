"""KV events over ZMQ the way vLLM's ``ZmqEventPublisher`` sends them.

* PUB socket: every batch is three frames ``[topic, seq, payload]`` (``topic`` is vLLM's
  default, empty: vllm-router's ``--kv-event-source`` only takes that one); ``seq`` is an 8-byte
  big-endian counter from 0 (it restarts at 0 when the engine restarts) and ``payload`` is
  msgpack ``[ts, events, data_parallel_rank]``, each event a map with a ``"type"`` key
  (``BlockStored``: ``block_hashes``, ``parent_block_hash``, ``token_ids``, ``block_size``,
  ``lora_id``, ``medium``; ``BlockRemoved``: ``block_hashes``, ``medium``;
  ``AllBlocksCleared``).
* ROUTER replay socket: a DEALER sends ``[b"", start_seq]``; the publisher answers every
  buffered batch with ``seq >= start_seq`` as ``[b"", topic, seq, payload]`` and ends with
  ``[b"", b"", -1, b""]`` (what vLLM 0.32 sends, checked against a real engine).

Faults for tests of the subscriber side: drop a share of batches (the sequence still advances,
as when a subscriber misses them) or garble them (the payload is not msgpack).
"""

from __future__ import annotations

import random
import time
from collections import deque
from typing import Any

import msgspec
import zmq
import zmq.asyncio

END_SEQ = (-1).to_bytes(8, "big", signed=True)


class KVEventPublisher:
    """One engine's PUB and replay sockets, bound on ``host`` (port 0: any free port)."""

    def __init__(self, ctx: zmq.asyncio.Context, host: str = "127.0.0.1", pub_port: int = 0,
                 replay_port: int = 0, topic: str = "", buffer_steps: int = 10_000,
                 seed: int = 0) -> None:
        self.topic = topic.encode()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.replay = ctx.socket(zmq.ROUTER)
        self.replay.setsockopt(zmq.LINGER, 0)
        self.endpoint = self._bind(self.pub, host, pub_port)
        self.replay_endpoint = self._bind(self.replay, host, replay_port)
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self.seq = 0
        self.drop_share = 0.0
        self.garble_share = 0.0
        self.published = 0
        self.dropped = 0
        self._random = random.Random(seed)
        self._encoder = msgspec.msgpack.Encoder()

    @staticmethod
    def _bind(socket: zmq.asyncio.Socket, host: str, port: int) -> str:
        if port:
            # A restart binds the port its previous sockets held; ZMQ closes those in its I/O
            # thread, so the port may be busy for a few milliseconds (EADDRINUSE).
            for attempt in range(200):
                try:
                    socket.bind(f"tcp://{host}:{port}")
                    break
                except zmq.ZMQError as exc:
                    if exc.errno != zmq.EADDRINUSE or attempt == 199:
                        raise
                    time.sleep(0.01)
        else:
            socket.bind(f"tcp://{host}:*")
        endpoint = socket.getsockopt(zmq.LAST_ENDPOINT)
        return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)

    def restart(self) -> None:
        """An engine restart as subscribers see it: the sequence starts again at 0 and the
        replay buffer is empty."""
        self.seq = 0
        self.buffer.clear()

    async def publish(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        seq = self.seq
        self.seq += 1
        payload = self._encoder.encode([time.time(), events, 0])
        roll = self._random.random()
        if roll < self.drop_share:
            self.dropped += 1
            self.buffer.append((seq, payload))  # replay still has it: only the live copy is lost
            return
        if roll < self.drop_share + self.garble_share:
            payload = b"\xc1garbled" + payload[:8]  # 0xc1 is never valid msgpack
        self.buffer.append((seq, payload))
        self.published += 1
        await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])

    async def serve_replay(self) -> None:
        """Answer replay requests until cancelled."""
        while True:
            frames = await self.replay.recv_multipart()
            if len(frames) != 3:
                continue
            client, _, start = frames
            try:
                start_seq = int.from_bytes(start, "big")
            except ValueError:
                continue
            for seq, payload in list(self.buffer):
                if seq >= start_seq:
                    await self.replay.send_multipart(
                        [client, b"", self.topic, seq.to_bytes(8, "big"), payload])
            await self.replay.send_multipart([client, b"", b"", END_SEQ, b""])

    def close(self) -> None:
        self.pub.close(linger=0)
        self.replay.close(linger=0)
