"""vLLM-compatible prefix-cache block hashing, so the router can name the blocks a prompt needs.

vLLM (v1 engine) hashes a prompt in *full* blocks of ``block_size`` tokens. Block *i*'s digest is
``H((parent_digest, tuple(tokens_of_block_i), extra_keys))`` where ``parent_digest`` is the full
digest of block *i-1*, or for block 0 the seed digest ``NONE_HASH = H(seed)``. ``H`` is chosen by
``--prefix-caching-hash-algo``:

* ``sha256_cbor``: SHA-256 of the canonical CBOR encoding (language-neutral; vLLM's default);
* ``sha256``: SHA-256 of the pickle (protocol 5, Python's highest in 3.11) encoding.

The seed is ``$PYTHONHASHSEED`` of the *engine* process when set, else ``"vllm-none-hash"``
(vLLM's rule for cryptographic algorithms; the xxhash algorithms use a random per-process seed
and cannot be reproduced, so they are not supported). ``extra_keys`` is ``None`` or a tuple of
tagged keys in vLLM's order: ``("lora", name, path)`` on every block of a LoRA request, then
``("cache_salt", salt)`` on block 0 only. Published KV events carry the digest's last 8 bytes as
an unsigned 64-bit integer (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``, on by default).

The CBOR encoding of the common case (no extra keys) is written by hand — it is a fixed shape:
an array of a 32-byte string, an array of unsigned integers and ``null`` — which is about twice as
fast as a generic encoder; extra keys go through ``cbor2``. Golden tests compare both paths with
vLLM's own functions.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import cbor2

HashAlgorithm = Literal["sha256_cbor", "sha256"]
SUPPORTED_ALGORITHMS: tuple[HashAlgorithm, ...] = ("sha256_cbor", "sha256")
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
PICKLE_PROTOCOL = 5
UINT64_MASK = (1 << 64) - 1

ExtraKey = tuple[str, ...]
ExtraKeys = tuple[ExtraKey, ...]


def resolve_seed(python_hash_seed: str | None) -> str:
    """The NONE_HASH seed vLLM derives for a cryptographic algorithm.

    ``python_hash_seed`` is the engine's ``PYTHONHASHSEED`` (``None`` when unset). Note that it is
    the *engine's* environment that counts, not the router's.
    """
    return DEFAULT_NONE_HASH_SEED if python_hash_seed is None else python_hash_seed


def engine_seed_from_environment() -> str:
    """The seed for an engine started with this process's environment (local engines)."""
    return resolve_seed(os.environ.get("PYTHONHASHSEED"))


def to_event_int(digest: bytes) -> int:
    """The uint64 form vLLM publishes in KV events: the digest's last 8 bytes, big-endian."""
    return int.from_bytes(digest[-8:], "big") & UINT64_MASK


@lru_cache(maxsize=1 << 18)
def _cbor_uint(value: int) -> bytes:
    """Canonical (shortest) CBOR encoding of a non-negative integer."""
    if value < 24:
        return bytes((value,))
    if value < 0x100:
        return bytes((0x18, value))
    if value < 0x10000:
        return b"\x19" + value.to_bytes(2, "big")
    if value < 0x1_0000_0000:
        return b"\x1a" + value.to_bytes(4, "big")
    return b"\x1b" + value.to_bytes(8, "big")


def _cbor_array_header(length: int) -> bytes:
    """Canonical CBOR header of an array of ``length`` items (major type 4)."""
    return bytes((0x80 | _cbor_uint(length)[0],)) + _cbor_uint(length)[1:]


_CBOR_ARRAY3 = b"\x83"
_CBOR_BYTES32 = b"\x58\x20"
_CBOR_NULL = b"\xf6"


@dataclass(frozen=True)
class BlockHashConfig:
    """The engine settings block hashes depend on."""

    block_size: int
    algorithm: HashAlgorithm = "sha256_cbor"
    seed: str = DEFAULT_NONE_HASH_SEED

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.algorithm not in SUPPORTED_ALGORITHMS:
            raise ValueError(f"prefix-caching hash algorithm {self.algorithm!r} is not supported; "
                             f"valid: {', '.join(SUPPORTED_ALGORITHMS)} (xxhash seeds are random "
                             "per engine process and cannot be reproduced by a router)")


class BlockHasher:
    """Computes vLLM's chained block digests for token sequences under one configuration."""

    def __init__(self, config: BlockHashConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        self._cbor = config.algorithm == "sha256_cbor"
        self.none_hash = self.hash_object(config.seed)

    def hash_object(self, value: object) -> bytes:
        """``H(value)`` for the configured algorithm (vLLM's ``sha256_cbor`` / ``sha256``)."""
        if self._cbor:
            return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()
        return hashlib.sha256(pickle.dumps(value, protocol=PICKLE_PROTOCOL)).digest()

    def hash_block(self, parent: bytes | None, tokens: Sequence[int],
                   extra_keys: ExtraKeys | None = None) -> bytes:
        """Digest of one full block given its parent's digest (``None`` for the first block)."""
        parent_digest = parent if parent else self.none_hash
        if not self._cbor:
            payload = pickle.dumps((parent_digest, tuple(tokens), extra_keys),
                                   protocol=PICKLE_PROTOCOL)
            return hashlib.sha256(payload).digest()
        if len(parent_digest) != 32:
            return self.hash_object((parent_digest, tuple(tokens), extra_keys))
        tail = _CBOR_NULL if extra_keys is None else cbor2.dumps(extra_keys, canonical=True)
        payload = b"".join((_CBOR_ARRAY3, _CBOR_BYTES32, parent_digest,
                            _cbor_array_header(len(tokens)), *map(_cbor_uint, tokens), tail))
        return hashlib.sha256(payload).digest()

    def block_digests(self, tokens: Sequence[int], *, lora: tuple[str, str] | None = None,
                      cache_salt: str | None = None, max_blocks: int | None = None,
                      ) -> list[bytes]:
        """Chained digests of every full block of ``tokens`` (a trailing partial block is skipped).

        ``lora`` is ``(lora_name, lora_path)`` as the engine registered the adapter; both are
        hashed. ``cache_salt`` applies to the first block only (an empty salt counts as none, as
        in vLLM).
        """
        size = self.block_size
        count = len(tokens) // size
        if max_blocks is not None:
            count = min(count, max_blocks)
        lora_keys: ExtraKeys = (("lora", lora[0], lora[1]),) if lora else ()
        digests: list[bytes] = []
        parent: bytes | None = None
        for index in range(count):
            keys = lora_keys
            if index == 0 and cache_salt:
                keys = (*lora_keys, ("cache_salt", cache_salt))
            parent = self.hash_block(parent, tokens[index * size:(index + 1) * size],
                                     keys or None)
            digests.append(parent)
        return digests

    def block_hashes(self, tokens: Sequence[int], *, lora: tuple[str, str] | None = None,
                     cache_salt: str | None = None, max_blocks: int | None = None) -> list[int]:
        """The uint64 event form of :meth:`block_digests`: what KV events name blocks by."""
        return [to_event_int(d) for d in self.block_digests(
            tokens, lora=lora, cache_salt=cache_salt, max_blocks=max_blocks)]
