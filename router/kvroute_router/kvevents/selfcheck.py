"""Self-check: recompute a sample of ``BlockStored`` hashes from their token ids.

If the router's block size, hash algorithm or seed differ from the engine's, every prompt hash
the router computes misses the index and precise routing silently degrades to "no prefix
anywhere". The check turns that into a loud alarm: a structured log line, the
``kvroute_kv_events_hash_mismatch_total`` metric and a :class:`HashCheckStatus` the router can
expose (and the precise scorer reads, falling back to the approximate scorer for that endpoint).

An event's ``parent_block_hash`` is only the last 8 bytes of the parent digest, so a chain can be
recomputed only from its root (``parent_block_hash`` null) or from a parent the check computed
itself (kept in a small bounded map). LoRA blocks are skipped: their hash includes the adapter's
path, which events do not carry.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from kvroute_router.kvevents.events import BlockStored, event_hash, event_hashes
from kvroute_router.kvevents.hashing import (
    BlockHashConfig,
    BlockHasher,
    ExtraKeys,
    HashAlgorithm,
    to_event_ints,
)

logger = logging.getLogger("kvroute.kvevents.selfcheck")

CheckResult = Literal["match", "mismatch", "unverifiable", "skipped"]


@dataclass
class HashCheckStatus:
    """What the self-check knows about one endpoint's hash settings."""

    state: Literal["unverified", "ok", "mismatch"] = "unverified"
    checked: int = 0
    matched: int = 0
    mismatched: int = 0
    unverifiable: int = 0
    last_mismatch: dict[str, Any] | None = field(default=None)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BlockHashSelfCheck:
    """Checks every event until ``always_first`` were verified, then one in ``sample_every``."""

    def __init__(self, endpoint: str, hasher: BlockHasher, *, sample_every: int = 16,
                 always_first: int = 32, known_digests: int = 4096) -> None:
        self.endpoint = endpoint
        self.hasher = hasher
        self.sample_every = max(1, sample_every)
        self.always_first = always_first
        self.status = HashCheckStatus()
        self._seen = 0
        self._known: OrderedDict[int, bytes] = OrderedDict()
        self._known_max = known_digests

    def known_count(self) -> int:
        """Block digests remembered now (bounded by ``known_digests``)."""
        return len(self._known)

    def check(self, event: BlockStored) -> CheckResult:
        self._seen += 1
        if self.status.matched >= self.always_first and self._seen % self.sample_every:
            return "skipped"
        if event.lora_name is not None or event.lora_id is not None or not event.block_hashes:
            return self._unverifiable()
        if event.parent_block_hash is not None and event.block_size == self.hasher.block_size \
                and event_hash(event.parent_block_hash) not in self._known:
            # Nothing to chain from: every way on from here ends unverifiable, so the token ids
            # are not decoded. Most sampled events are such continuations once the first
            # ``always_first`` passed (and all of them on an engine whose roots the check never
            # saw), so this keeps the check's cost per event to a lookup.
            return self._unverifiable()
        tokens = event.tokens()
        if tokens is None or event.block_size <= 0 or \
                len(tokens) < len(event.block_hashes) * event.block_size:
            # A malformed event (no block size, fewer tokens than its blocks hold) says nothing
            # about the hash settings; raising the alarm on it would turn precise routing off.
            return self._unverifiable()
        if event.block_size != self.hasher.block_size:
            return self._mismatch(event, "block size", computed=None)
        salt_known, salt = _cache_salt(event)
        if not salt_known:
            return self._unverifiable()
        parent: bytes | None = None
        if event.parent_block_hash is not None:
            found = self._known.get(event_hash(event.parent_block_hash))
            if found is None:
                return self._unverifiable()
            parent = found
            salt = None
        digests = self._chain(parent, tokens, len(event.block_hashes), salt, self.hasher)
        published = event_hashes(event.block_hashes)
        computed = to_event_ints(digests)
        self.status.checked += 1
        if computed != published:
            return self._mismatch(event, self._diagnose(tokens, parent, salt, published),
                                  computed=computed)
        self.status.matched += 1
        if self.status.state == "unverified":
            self.status.state = "ok"
        for value, digest in zip(computed, digests, strict=True):
            self._known[value] = digest
            self._known.move_to_end(value)
        while len(self._known) > self._known_max:
            self._known.popitem(last=False)
        return "match"

    @staticmethod
    def _chain(parent: bytes | None, tokens: list[int], blocks: int, salt: str | None,
               hasher: BlockHasher) -> list[bytes]:
        """The hasher's chain (memoised: blocks the router already hashed for a prompt cost a
        lookup, with the same result)."""
        first: ExtraKeys | None = (("cache_salt", salt),) if salt else None
        return hasher.chain(parent, tokens, blocks, first_keys=first, keys=None)

    def _diagnose(self, tokens: list[int], parent: bytes | None, salt: str | None,
                  published: list[int]) -> str:
        """Name the likely cause by trying the other algorithm with the same seed."""
        config = self.hasher.config
        other: HashAlgorithm = "sha256" if config.algorithm == "sha256_cbor" else "sha256_cbor"
        if parent is None:
            alternative = BlockHasher(BlockHashConfig(config.block_size, other, config.seed),
                                      memo_blocks=0)
            alt = self._chain(None, tokens, len(published), salt, alternative)
            if to_event_ints(alt) == published:
                return f"hash algorithm (engine uses {other}, router {config.algorithm})"
        return ("seed or algorithm (engine PYTHONHASHSEED differs from the router's seed "
                f"{config.seed!r}, or an algorithm other than {config.algorithm})")

    def _unverifiable(self) -> CheckResult:
        self.status.unverifiable += 1
        return "unverifiable"

    def _mismatch(self, event: BlockStored, cause: str, computed: list[int] | None
                  ) -> CheckResult:
        self.status.checked += 1
        self.status.mismatched += 1
        self.status.state = "mismatch"
        detail = {
            "endpoint": self.endpoint,
            "likely_cause": cause,
            "router_block_size": self.hasher.block_size,
            "event_block_size": event.block_size,
            "router_algorithm": self.hasher.config.algorithm,
            "router_seed": self.hasher.config.seed,
            "published_hashes": [event_hash(h) for h in event.block_hashes[:4]],
            "computed_hashes": (computed or [])[:4],
        }
        self.status.last_mismatch = detail
        logger.error("kv-events hash mismatch: the router cannot reproduce this engine's block "
                     "hashes; precise prefix routing is off for it. %s", json.dumps(detail),
                     extra={"kvroute": detail})
        return "mismatch"


def _cache_salt(event: BlockStored) -> tuple[bool, str | None]:
    """``(known, salt)``: the cache salt of the event's first block (``None`` if none).

    Published extra keys are untagged (one entry per block); without LoRA or multimodal input
    the only key is the salt, and only on the request's first block.
    """
    if not event.extra_keys:
        return True, None
    first = event.extra_keys[0]
    if any(keys for keys in event.extra_keys[1:]):
        return False, None
    if not first:
        return True, None
    if (event.parent_block_hash is None and isinstance(first, list | tuple) and len(first) == 1
            and isinstance(first[0], str)):
        return True, first[0]
    return False, None  # not a shape vLLM publishes (a garbled event): not checked
