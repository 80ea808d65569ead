"""Where cached answers live: the vector index and the per-replica memory backend.

Every backend answers three questions: the answer stored under an exact key
(:meth:`ResponseStore.get_exact`), the closest answer in a partition at or above a cosine
similarity (:meth:`ResponseStore.search`), and how many entries it holds; and it keeps
(:meth:`ResponseStore.put`) an entry with its lifetime. An entry's id is its exact key, so an
answer written twice for the same request replaces itself.

:class:`VectorIndex` is the semantic index of both backends: per partition, a matrix of unit
vectors (rows grown by doubling, a removed row replaced by the last one) searched with one
matrix-vector product. Entries carry their absolute expiry (wall clock, shared by replicas);
expired ones are dropped from a heap before each operation.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]
Clock = Callable[[], float]


@dataclass(slots=True)
class Entry:
    """One cached answer."""

    id: str
    """The request's exact key."""
    partition: str
    vector: Vector | None
    """Unit embedding of the query text; None: exact lookups only."""
    answer: bytes
    expires_at: float
    """Wall-clock time (``time.time()``) after which the entry is gone."""


class ResponseStore(Protocol):
    """A response-cache backend."""

    backend: str

    async def get_exact(self, key: str) -> bytes | None: ...

    async def search(self, partition: str, vector: Vector, threshold: float
                     ) -> tuple[bytes, float] | None: ...

    async def put(self, entry: Entry) -> int:
        """Store; returns how many entries were evicted to stay within ``max_entries``."""
        ...

    async def entries(self) -> int: ...

    async def close(self) -> None: ...


class VectorIndex:
    """Unit vectors by id, grouped by partition; ``search`` → the best id and its cosine."""

    def __init__(self, dimensions: int | None = None) -> None:
        self.dimensions = dimensions
        self._parts: dict[str, _Partition] = {}
        self._where: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._where

    def add(self, entry_id: str, partition: str, vector: Vector) -> None:
        if self.dimensions is None:
            self.dimensions = int(vector.shape[0])
        if vector.shape != (self.dimensions,):
            return  # another model's vector (the tier's model changed): not comparable
        self.remove(entry_id)
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = _Partition(self.dimensions)
        part.add(entry_id, vector)
        self._where[entry_id] = partition

    def remove(self, entry_id: str) -> None:
        partition = self._where.pop(entry_id, None)
        if partition is None:
            return
        part = self._parts[partition]
        part.remove(entry_id)
        if not part.ids:
            del self._parts[partition]

    def search(self, partition: str, vector: Vector) -> tuple[str, float] | None:
        part = self._parts.get(partition)
        if part is None or vector.shape != (self.dimensions,):
            return None
        return part.best(vector)

    def clear(self) -> None:
        self._parts.clear()
        self._where.clear()


class _Partition:
    def __init__(self, dimensions: int) -> None:
        self.matrix: Vector = np.zeros((8, dimensions), dtype=np.float32)
        self.ids: list[str] = []
        self.row: dict[str, int] = {}

    def add(self, entry_id: str, vector: Vector) -> None:
        n = len(self.ids)
        if n == self.matrix.shape[0]:
            grown = np.zeros((2 * n, self.matrix.shape[1]), dtype=np.float32)
            grown[:n] = self.matrix
            self.matrix = grown
        self.matrix[n] = vector
        self.ids.append(entry_id)
        self.row[entry_id] = n

    def remove(self, entry_id: str) -> None:
        row = self.row.pop(entry_id)
        last = len(self.ids) - 1
        if row != last:
            moved = self.ids[last]
            self.matrix[row] = self.matrix[last]
            self.ids[row] = moved
            self.row[moved] = row
        self.ids.pop()

    def best(self, vector: Vector) -> tuple[str, float] | None:
        n = len(self.ids)
        if n == 0:
            return None
        scores = self.matrix[:n] @ vector
        row = int(np.argmax(scores))
        return self.ids[row], float(scores[row])


class MemoryStore:
    """Per-replica backend: an LRU of at most ``max_entries`` entries plus the vector index."""

    backend = "memory"

    def __init__(self, max_entries: int, clock: Clock = time.time) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._expiry: list[tuple[float, str]] = []
        self.index = VectorIndex()

    def _expire(self) -> None:
        now = self.clock()
        while self._expiry and self._expiry[0][0] <= now:
            expires_at, entry_id = heapq.heappop(self._expiry)
            entry = self._entries.get(entry_id)
            if entry is not None and entry.expires_at == expires_at:
                self._drop(entry_id)

    def _drop(self, entry_id: str) -> None:
        self._entries.pop(entry_id, None)
        self.index.remove(entry_id)

    async def get_exact(self, key: str) -> bytes | None:
        self._expire()
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.answer

    async def search(self, partition: str, vector: Vector, threshold: float
                     ) -> tuple[bytes, float] | None:
        self._expire()
        found = self.index.search(partition, vector)
        if found is None or found[1] < threshold:
            return None
        entry_id, score = found
        self._entries.move_to_end(entry_id)
        return self._entries[entry_id].answer, score

    async def put(self, entry: Entry) -> int:
        self._expire()
        self._drop(entry.id)
        self._entries[entry.id] = entry
        heapq.heappush(self._expiry, (entry.expires_at, entry.id))
        if entry.vector is not None:
            self.index.add(entry.id, entry.partition, entry.vector)
        evicted = 0
        while len(self._entries) > self.max_entries:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            evicted += 1
        if len(self._expiry) > 2 * max(self.max_entries, 1024):  # replaced entries' leftovers
            self._expiry = [(t, i) for t, i in self._expiry
                            if i in self._entries and self._entries[i].expires_at == t]
            heapq.heapify(self._expiry)
        return evicted

    async def entries(self) -> int:
        self._expire()
        return len(self._entries)

    async def close(self) -> None:
        self._entries.clear()
        self.index.clear()


__all__ = ["Entry", "MemoryStore", "ResponseStore", "Vector", "VectorIndex"]
