"""Meters behind budget ledgers: sliding-window sums (USD, tokens, requests) and in-flight
counts (concurrency), with an atomic check-then-add over several meters at once.

Two stores with the same semantics:

* ``InMemoryMeterStore`` — per router replica; atomic because the router's event loop runs
  the check and the add without yielding;
* ``RedisMeterStore`` — shared by every replica; one Lua script checks and adds atomically on
  the Redis server, and recent spend survives a router restart.

A sliding window of length W is kept as ``buckets`` buckets of width W/buckets (bucket index =
floor(now / width)); a bucket leaves the window once it is older than W. In-flight requests are
members scored by a deadline, so a replica that dies without releasing them cannot leak
concurrency past that deadline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

MeterKind = Literal["window", "inflight"]
DEFAULT_BUCKETS = 60
SWEEP_S = 60.0
"""``InMemoryMeterStore`` drops the meters of tenants gone quiet at most this often."""


@dataclass(frozen=True)
class MeterCharge:
    """A request's claim on one meter: ``amount`` must fit under ``limit``."""

    key: str
    kind: MeterKind
    limit: float
    amount: float
    window_s: float = 60.0
    buckets: int = DEFAULT_BUCKETS

    @property
    def width_s(self) -> float:
        return self.window_s / self.buckets


@dataclass(frozen=True)
class ChargeRefused:
    """Which charge did not fit, how much of its meter is used, and when it would fit."""

    index: int
    used: float
    retry_after_s: float


def bucket_of(now: float, width_s: float) -> int:
    return math.floor(now / width_s)


def adjustment_bucket(delta: float, charged_at: float, now: float, window_s: float,
                      buckets: int) -> int | None:
    """The bucket a settle-time correction of a charge made at ``charged_at`` belongs in: the
    charge's own bucket while it is still in the window; once it has aged out, a refund is
    dropped (None) and an extra charge lands in the current bucket."""
    width = window_s / buckets
    target = bucket_of(charged_at, width)
    if target < bucket_of(now, width) - buckets + 1:
        if delta <= 0:
            return None
        target = bucket_of(now, width)
    return target


def retry_after(buckets: Mapping[int, float], now: float, charge: MeterCharge) -> float:
    """Seconds until enough old buckets leave the window for ``charge.amount`` to fit; the whole
    window when even an empty window could not hold it."""
    current = bucket_of(now, charge.width_s)
    oldest = current - charge.buckets + 1
    live = sorted((b, v) for b, v in buckets.items() if b >= oldest)
    used = sum(v for _, v in live)
    if charge.amount > charge.limit:
        return charge.window_s
    for bucket, value in live:
        used -= value
        if used + charge.amount <= charge.limit + 1e-9:
            return max(0.0, (bucket + charge.buckets) * charge.width_s - now)
    return charge.window_s


class MeterStore(Protocol):
    """Atomic multi-meter reservation; see the module docstring."""

    async def try_charge(self, charges: Sequence[MeterCharge], now: float, member: str,
                         deadline: float) -> ChargeRefused | None:
        """Add every charge if all fit (inflight charges add ``member`` until ``deadline``);
        otherwise change nothing and say which did not fit."""
        ...

    async def adjust(self, key: str, delta: float, charged_at: float, now: float,
                     window_s: float, buckets: int) -> None:
        """Correct a window meter by ``delta`` in the bucket of ``charged_at`` (or the current
        bucket when that one has left the window)."""
        ...

    async def release(self, key: str, member: str) -> None:
        """Remove an in-flight member."""
        ...

    async def used(self, charge: MeterCharge, now: float) -> float:
        """Current total of a meter (window sum or live in-flight members)."""
        ...


class InMemoryMeterStore:
    """Meters in this process; see the module docstring."""

    def __init__(self) -> None:
        self._windows: dict[str, dict[int, float]] = {}
        self._inflight: dict[str, dict[str, float]] = {}
        self._shapes: dict[str, MeterCharge] = {}
        """The last charge of each window meter: its bucket width and count, for the sweep."""
        self._swept_at: float | None = None

    def _sweep(self, now: float) -> None:
        """Every ``SWEEP_S``: prune every meter, dropping those left empty. Without it a meter
        was pruned only when its tenant came back: one per tenant ever seen stayed."""
        if self._swept_at is not None and now - self._swept_at < SWEEP_S:
            return
        self._swept_at = now
        for key in list(self._windows):
            shape = self._shapes.get(key)
            if shape is not None:
                self._prune(shape, now)
        for key in [k for k in self._shapes if k not in self._windows]:
            del self._shapes[key]
        for key in list(self._inflight):
            self._live(key, now)

    def sizes(self) -> dict[str, int]:
        """Meter keys, window buckets and in-flight members held (for leak watching)."""
        return {"budget_meter_keys": len(self._windows) + len(self._inflight),
                "budget_window_buckets": sum(len(b) for b in self._windows.values()),
                "budget_inflight_members": sum(len(m) for m in self._inflight.values())}

    def _prune(self, charge: MeterCharge, now: float) -> dict[int, float]:
        """The meter's live buckets; a meter left empty is dropped (one key per tenant ever
        seen stayed otherwise)."""
        buckets = self._windows.get(charge.key, {})
        oldest = bucket_of(now, charge.width_s) - charge.buckets + 1
        for stale in [b for b in buckets if b < oldest]:
            del buckets[stale]
        if not buckets:
            self._windows.pop(charge.key, None)
        return buckets

    def _live(self, key: str, now: float) -> dict[str, float]:
        members = self._inflight.get(key, {})
        for stale in [m for m, deadline in members.items() if deadline <= now]:
            del members[stale]
        if not members:
            self._inflight.pop(key, None)
        return members

    async def try_charge(self, charges: Sequence[MeterCharge], now: float, member: str,
                         deadline: float) -> ChargeRefused | None:
        # No await between the checks and the adds: atomic on the event loop.
        self._sweep(now)
        for index, charge in enumerate(charges):
            if charge.kind == "window":
                buckets = self._prune(charge, now)
                used = sum(buckets.values())
                if used + charge.amount > charge.limit + 1e-9:
                    return ChargeRefused(index, used, retry_after(buckets, now, charge))
            else:
                used = float(len(self._live(charge.key, now)))
                if used + 1 > charge.limit + 1e-9:
                    return ChargeRefused(index, used, 1.0)
        for charge in charges:
            if charge.kind == "window":
                bucket = bucket_of(now, charge.width_s)
                buckets = self._windows.setdefault(charge.key, {})
                buckets[bucket] = buckets.get(bucket, 0.0) + charge.amount
                self._shapes[charge.key] = charge
            else:
                self._inflight.setdefault(charge.key, {})[member] = deadline
        return None

    async def adjust(self, key: str, delta: float, charged_at: float, now: float,
                     window_s: float, buckets: int) -> None:
        target = adjustment_bucket(delta, charged_at, now, window_s, buckets)
        if target is None:
            return
        meter = self._windows.setdefault(key, {})
        meter[target] = meter.get(target, 0.0) + delta
        self._shapes.setdefault(key, MeterCharge(key, "window", 0.0, 0.0, window_s=window_s,
                                                 buckets=buckets))

    async def release(self, key: str, member: str) -> None:
        members = self._inflight.get(key)
        if members is not None:
            members.pop(member, None)
            if not members:
                del self._inflight[key]

    async def used(self, charge: MeterCharge, now: float) -> float:
        if charge.kind == "window":
            return float(sum(self._prune(charge, now).values()))
        return float(len(self._live(charge.key, now)))

    async def buckets(self, charge: MeterCharge, now: float) -> dict[int, float]:
        return dict(self._prune(charge, now))


# KEYS: one per charge. ARGV: now, member, deadline, then per charge: kind, limit, amount,
# width, buckets. Window meters are hashes bucket -> amount; in-flight meters are sorted sets
# member -> deadline. Returns 0 when every charge was added, else the 1-based index of the first
# charge that did not fit.
_TRY_CHARGE_LUA = """
local now = tonumber(ARGV[1])
local member = ARGV[2]
local deadline = tonumber(ARGV[3])
local n = #KEYS
for i = 1, n do
  local base = 3 + (i - 1) * 5
  local kind = ARGV[base + 1]
  local limit = tonumber(ARGV[base + 2])
  local amount = tonumber(ARGV[base + 3])
  local width = tonumber(ARGV[base + 4])
  local buckets = tonumber(ARGV[base + 5])
  local used = 0
  if kind == 'window' then
    local oldest = math.floor(now / width) - buckets + 1
    local fields = redis.call('HGETALL', KEYS[i])
    for j = 1, #fields, 2 do
      local b = tonumber(fields[j])
      if b < oldest then
        redis.call('HDEL', KEYS[i], fields[j])
      else
        used = used + tonumber(fields[j + 1])
      end
    end
  else
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    used = redis.call('ZCARD', KEYS[i])
    amount = 1
  end
  if used + amount > limit + 1e-9 then
    return i
  end
end
for i = 1, n do
  local base = 3 + (i - 1) * 5
  local kind = ARGV[base + 1]
  local amount = tonumber(ARGV[base + 3])
  local width = tonumber(ARGV[base + 4])
  local buckets = tonumber(ARGV[base + 5])
  if kind == 'window' then
    redis.call('HINCRBYFLOAT', KEYS[i], tostring(math.floor(now / width)), amount)
    redis.call('EXPIRE', KEYS[i], math.ceil(width * buckets) + 60)
  else
    redis.call('ZADD', KEYS[i], deadline, member)
    redis.call('EXPIRE', KEYS[i], math.ceil(deadline - now) + 60)
  end
end
return 0
"""


class RedisMeterStore:
    """Meters in Redis, shared by all router replicas; see the module docstring. ``client`` is a
    ``redis.asyncio.Redis`` (``decode_responses`` either way)."""

    def __init__(self, client: Any, *, prefix: str = "kvroute:budget:") -> None:
        self._client = client
        self._prefix = prefix
        self._script = client.register_script(_TRY_CHARGE_LUA)

    def _key(self, key: str) -> str:
        return self._prefix + key

    async def _buckets(self, charge: MeterCharge, now: float) -> dict[int, float]:
        raw = await self._client.hgetall(self._key(charge.key))
        oldest = bucket_of(now, charge.width_s) - charge.buckets + 1
        buckets = {int(b): float(v) for b, v in raw.items()}
        return {b: v for b, v in buckets.items() if b >= oldest}

    async def try_charge(self, charges: Sequence[MeterCharge], now: float, member: str,
                         deadline: float) -> ChargeRefused | None:
        if not charges:
            return None
        args: list[Any] = [repr(now), member, repr(deadline)]
        for charge in charges:
            args += [charge.kind, repr(charge.limit), repr(charge.amount), repr(charge.width_s),
                     charge.buckets]
        failed = int(await self._script(keys=[self._key(c.key) for c in charges], args=args))
        if failed == 0:
            return None
        charge = charges[failed - 1]
        if charge.kind == "inflight":
            used = float(await self._client.zcount(self._key(charge.key), f"({now!r}", "+inf"))
            return ChargeRefused(failed - 1, used, 1.0)
        buckets = await self._buckets(charge, now)
        return ChargeRefused(failed - 1, sum(buckets.values()), retry_after(buckets, now, charge))

    async def adjust(self, key: str, delta: float, charged_at: float, now: float,
                     window_s: float, buckets: int) -> None:
        target = adjustment_bucket(delta, charged_at, now, window_s, buckets)
        if target is None:
            return
        await self._client.hincrbyfloat(self._key(key), str(target), delta)

    async def release(self, key: str, member: str) -> None:
        await self._client.zrem(self._key(key), member)

    async def used(self, charge: MeterCharge, now: float) -> float:
        if charge.kind == "window":
            return float(sum((await self._buckets(charge, now)).values()))
        return float(await self._client.zcount(self._key(charge.key), f"({now!r}", "+inf"))
