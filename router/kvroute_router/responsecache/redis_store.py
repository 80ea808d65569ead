"""The shared backend: answers in Redis, read and written by every router replica.

Redis holds the truth; each replica keeps a copy of the vector index in memory and follows
Redis's changes, so a semantic lookup is one matrix product here plus one ``HGET`` there.

Keys, under ``<keyPrefix>rc:<tier>:``:

* ``e:<id>`` — hash of one entry: ``a`` answer, ``p`` partition, ``v`` vector (float32 bytes,
  empty for exact-only entries), ``x`` expiry (epoch seconds); the key expires with the entry;
* ``lru`` — sorted set of entry ids by last use: beyond ``maxEntries`` the least recently used
  are popped and deleted (``ZPOPMIN``, atomic across replicas), so memory stays bounded by
  ``maxEntries`` answers plus a log of at most :data:`LOG_MAXLEN` events;
* ``log`` — stream of ``add``/``del`` events (``XADD … MAXLEN ~``).

Consistency of the in-memory index: at start (and whenever the log was trimmed past the last
event this replica read) the index is rebuilt by scanning ``e:*``, having noted the log's last
id first; before each semantic search the replica applies the log's new events. An index row
whose entry is gone from Redis (expired, evicted, flushed) is found out at the ``HGET`` — the
row is dropped and the lookup is a miss — so the index can be behind Redis but never serves an
answer Redis no longer has.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from kvroute_router.responsecache.store import Clock, Entry, Vector, VectorIndex

log = logging.getLogger(__name__)

LOG_MAXLEN = 10_000
SYNC_BATCH = 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    """Response-cache backend in Redis (``redis.asyncio`` client, bytes responses)."""

    backend = "redis"

    def __init__(self, client: Any, prefix: str, max_entries: int,
                 clock: Clock = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.max_entries = max_entries
        self.clock = clock
        self.index = VectorIndex()
        self._expires: dict[str, float] = {}
        self._last_id: str | None = None
        self._consumed = 0
        """Log events this replica has applied (compared with the log's ``entries-added``)."""

    def _key(self, entry_id: str) -> str:
        return f"{self.prefix}e:{entry_id}"

    @property
    def _lru(self) -> str:
        return f"{self.prefix}lru"

    @property
    def _log(self) -> str:
        return f"{self.prefix}log"

    # ---- reads -------------------------------------------------------------------------------
    async def get_exact(self, key: str) -> bytes | None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(self._key(key), "a")
            pipe.zadd(self._lru, {key: self.clock()}, xx=True)
            answer, _ = await pipe.execute()
        return bytes(answer) if answer is not None else None

    async def search(self, partition: str, vector: Vector, threshold: float
                     ) -> tuple[bytes, float] | None:
        await self.sync()
        now = self.clock()
        for _ in range(4):  # skip rows whose entry expired or left Redis meanwhile
            found = self.index.search(partition, vector)
            if found is None or found[1] < threshold:
                return None
            entry_id, score = found
            if self._expires.get(entry_id, 0.0) > now:
                answer = await self.get_exact(entry_id)
                if answer is not None:
                    return answer, score
            self._forget(entry_id)
        return None

    # ---- writes ------------------------------------------------------------------------------
    async def put(self, entry: Entry) -> int:
        ttl_ms = max(1, int((entry.expires_at - self.clock()) * 1000))
        key = self._key(entry.id)
        vector = entry.vector.astype(np.float32).tobytes() if entry.vector is not None else b""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"a": entry.answer, "p": entry.partition, "v": vector,
                                    "x": repr(entry.expires_at)})
            pipe.pexpire(key, ttl_ms)
            pipe.zadd(self._lru, {entry.id: self.clock()})
            pipe.xadd(self._log, {"o": "add", "i": entry.id}, maxlen=LOG_MAXLEN,
                      approximate=True)
            pipe.zcard(self._lru)
            results = await pipe.execute()
        self._remember(entry.id, entry.partition, entry.vector, entry.expires_at)
        excess = int(results[-1]) - self.max_entries
        if excess <= 0:
            return 0
        popped = await self.client.zpopmin(self._lru, excess)
        ids = [_text(member) for member, _ in popped]
        if not ids:
            return 0
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.delete(*[self._key(i) for i in ids])
            for entry_id in ids:
                pipe.xadd(self._log, {"o": "del", "i": entry_id}, maxlen=LOG_MAXLEN,
                          approximate=True)
            await pipe.execute()
        for entry_id in ids:
            self._forget(entry_id)
        return len(ids)

    async def entries(self) -> int:
        return int(await self.client.zcard(self._lru))

    async def close(self) -> None:
        await self.client.aclose()

    # ---- the in-memory index -------------------------------------------------------------------
    def _remember(self, entry_id: str, partition: str, vector: Vector | None,
                  expires_at: float) -> None:
        if vector is None:
            self._forget(entry_id)
            return
        self.index.add(entry_id, partition, vector)
        self._expires[entry_id] = expires_at

    def _forget(self, entry_id: str) -> None:
        self.index.remove(entry_id)
        self._expires.pop(entry_id, None)

    async def sync(self) -> None:
        """Bring the index up to date with Redis; rebuild it when the log no longer holds every
        event since the last one read (trimmed past it, or the database was flushed)."""
        if self._last_id is None:
            await self.rebuild()
            return
        while True:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.xinfo_stream(self._log)
                pipe.xread({self._log: self._last_id}, count=SYNC_BATCH)
                info, read = await pipe.execute(raise_on_error=False)
            if isinstance(info, Exception):  # no log (flushed, or nothing written yet)
                if self._consumed:
                    await self.rebuild()
                return
            added, length = int(info["entries-added"]), int(info["length"])
            if added < self._consumed or added - self._consumed > length:
                log.info("response-cache log of %s no longer covers this replica's position: "
                         "rebuilding the index", self.prefix)
                await self.rebuild()
                return
            events = read[0][1] if read and not isinstance(read, Exception) else []
            if not events:
                return
            self._consumed += len(events)
            await self._apply(events)
            if len(events) < SYNC_BATCH:
                return

    async def _apply(self, events: list[Any]) -> None:
        added: list[str] = []
        for event_id, fields in events:
            self._last_id = _text(event_id)
            op = _text(fields.get(b"o", fields.get("o", b"")))
            entry_id = _text(fields.get(b"i", fields.get("i", b"")))
            if op == "del":
                self._forget(entry_id)
                added = [a for a in added if a != entry_id]
            elif op == "add":
                added.append(entry_id)
        await self._load(added)

    async def _load(self, ids: list[str]) -> None:
        if not ids:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.hmget(self._key(entry_id), "p", "v", "x")
            rows = await pipe.execute()
        now = self.clock()
        for entry_id, (partition, vector, expires) in zip(ids, rows, strict=True):
            if partition is None or not vector or expires is None:
                self._forget(entry_id)
                continue
            expires_at = float(_text(expires))
            if expires_at <= now:
                self._forget(entry_id)
                continue
            self._remember(entry_id, _text(partition),
                           np.frombuffer(vector, dtype=np.float32).copy(), expires_at)

    async def rebuild(self) -> None:
        """Rebuild the index from Redis: note the log's position, then scan every entry."""
        try:
            info = await self.client.xinfo_stream(self._log)
        except Exception:  # no log yet
            self._last_id, self._consumed = "0-0", 0
        else:
            self._last_id = _text(info["last-generated-id"])
            self._consumed = int(info["entries-added"])
        self.index.clear()
        self._expires.clear()
        batch: list[str] = []
        async for key in self.client.scan_iter(match=f"{self.prefix}e:*", count=1000):
            batch.append(_text(key)[len(self.prefix) + 2:])
            if len(batch) >= 1000:
                await self._load(batch)
                batch = []
        await self._load(batch)


__all__ = ["LOG_MAXLEN", "RedisStore"]
