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

Speed (a routing decision hashes every full block of the prompt, 256 blocks for 4k tokens at
block size 16):

* the CBOR encoding is written by hand for the fixed shape ``[bytes32, [uint...], null | keys]``:
  each token id's encoding comes from a dictionary filled on first sight and a block's payload
  is one ``bytes.join`` — measured 1.5x faster than ``cbor2`` per block
  (``bench/tokenize_hash.py`` keeps the ``cbor2`` reference); extra keys go through ``cbor2``,
  once per prompt;
* a bounded memo maps *(parent digest, token ids of a run of blocks)* to the run's digests, runs
  of ``MEMO_CHUNK_TOKENS`` (128) tokens. A repeated prompt, or one that extends a prompt seen
  before (the next chat turn, a shared system prompt), only hashes its new blocks (and the
  trailing blocks that do not fill a run). The memo is exact — the key holds the full parent
  digest and the packed token ids, so a hit is what this hasher would compute — and bounded
  first in, first out (``memo_blocks`` blocks, about 150 bytes per block). Blocks with extra
  keys (LoRA, a salted block 0) are computed, not memoised.

Golden tests compare every path (cold, memoised, hand-written CBOR, ``cbor2``, pickle) with
vLLM's own functions.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeGuard

import cbor2
import numpy as np

HashAlgorithm = Literal["sha256_cbor", "sha256"]
SUPPORTED_ALGORITHMS: tuple[HashAlgorithm, ...] = ("sha256_cbor", "sha256")
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
PICKLE_PROTOCOL = 5
UINT64_MASK = (1 << 64) - 1
DEFAULT_MEMO_BLOCKS = 1 << 16
"""Memoised blocks per hasher: 65,536 blocks (1M tokens at block size 16), about 10 MB."""
MEMO_CHUNK_TOKENS = 128
"""The memo stores runs of whole blocks of about this many tokens (8 blocks at block size 16)
under one key: one dictionary entry per run keeps its cost on a miss small."""

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


def to_event_ints(digests: Sequence[bytes]) -> list[int]:
    """:func:`to_event_int` of many 32-byte digests at once: every fourth big-endian word of
    their concatenation (~20 µs for a 7k-token prompt's 450 digests; a slice of each digest
    and one ``struct.unpack`` took ~50)."""
    if not digests:
        return []
    joined = b"".join(digests)
    if len(joined) != 32 * len(digests) or len(set(map(len, digests))) != 1:
        return [to_event_int(d) for d in digests]  # not all 32 bytes: one at a time
    words: list[int] = np.frombuffer(joined, dtype=">u8")[3::4].tolist()
    return words


def is_packed(tokens: Sequence[int]) -> TypeGuard[array[int]]:
    """Whether ``tokens`` are packed 4-byte unsigned ids (``array('I')``, as the tokenizer hands
    them out): the hasher reads their bytes as they are."""
    return type(tokens) is array and tokens.typecode == "I"


def _cbor_uint(value: int) -> bytes:
    """Canonical (shortest) CBOR encoding of a non-negative integer below 2**64."""
    if value < 24:
        return bytes((value,))
    if value < 0x100:
        return bytes((0x18, value))
    if value < 0x10000:
        return b"\x19" + value.to_bytes(2, "big")
    if value < 0x1_0000_0000:
        return b"\x1a" + value.to_bytes(4, "big")
    return b"\x1b" + value.to_bytes(8, "big")


_TOKEN_CBOR: dict[int, bytes] = {}
"""Token id → its canonical CBOR encoding, filled on first sight (a vocabulary's worth at most:
``_TOKEN_CBOR_MAX`` entries, about 80 bytes each)."""
_TOKEN_CBOR_MAX = 1 << 20


def _encode_token(value: object) -> bytes:
    """One token id's canonical CBOR item (remembered when it is a plain uint64)."""
    if type(value) is int and 0 <= value <= UINT64_MASK:
        encoded = _cbor_uint(value)
        if len(_TOKEN_CBOR) < _TOKEN_CBOR_MAX:
            _TOKEN_CBOR[value] = encoded
        return encoded
    return cbor2.dumps(value, canonical=True)  # not a token id vLLM produces; still exact


def _encode_tokens(tokens: Sequence[int]) -> list[bytes]:
    """Every token id's canonical CBOR item, in order."""
    pieces: list[bytes | None] = list(map(_TOKEN_CBOR.get, tokens))
    try:
        if b"".join(pieces):  # type: ignore[arg-type]  # raises TypeError if any is None
            return pieces  # type: ignore[return-value]
    except TypeError:
        pass
    return [piece if piece is not None else _encode_token(token)
            for piece, token in zip(pieces, tokens, strict=True)]


_WIDTH_BOUNDS = np.array([24, 0x100, 0x10000, 0x1_0000_0000], dtype=np.int64)
_WIDTHS = np.array([1, 2, 3, 5, 9], dtype=np.int64)  # item bytes per width class
_HEADERS = np.array([0, 0x18, 0x19, 0x1A, 0x1B], dtype=np.uint8)
_KEEP = np.array([[column == 0 or column >= 10 - width for column in range(9)]
                  for width in (1, 2, 3, 5, 9)])
"""Per width class, which of [header, 8 big-endian value bytes] the item keeps."""


def _encode_blocks(tokens: Sequence[int], size: int) -> tuple[bytes, list[int]]:
    """The canonical CBOR items of ``tokens`` (whole blocks of ``size``) as one byte string, and
    where each block starts in it (one more offset than blocks).

    Vectorised with numpy — a token's item is a header byte plus the last ``width - 1`` bytes of
    its big-endian uint64 — so its cost does not depend on the vocabulary (a per-token table
    lookup does: random access into a large table). Falls back to the table for token ids
    outside int64 (never produced by a tokenizer) or negative ones.
    """
    values: np.ndarray[tuple[int], np.dtype[np.int64]] | None
    if is_packed(tokens):
        values = np.frombuffer(tokens, dtype=np.uintc).astype(np.int64)
    else:
        try:
            values = np.fromiter(tokens, dtype=np.int64, count=len(tokens))
        except (OverflowError, TypeError, ValueError):
            values = None
    if values is None or (len(values) and int(values.min()) < 0):
        pieces = _encode_tokens(tokens)
        join = b"".join
        blocks = [join(pieces[i:i + size]) for i in range(0, len(pieces), size)]
        return join(blocks), [0, *itertools.accumulate(map(len, blocks))]
    width_class = np.searchsorted(_WIDTH_BOUNDS, values, side="right")
    items = np.empty((len(values), 9), dtype=np.uint8)
    items[:, 1:] = values.astype(">u8").view(np.uint8).reshape(-1, 8)
    items[:, 0] = np.where(width_class == 0, values, _HEADERS[width_class])
    ends = np.cumsum(_WIDTHS[width_class].reshape(-1, size).sum(axis=1)).tolist()
    return items[_KEEP[width_class]].tobytes(), [0, *ends]


def _cbor_array_header(length: int) -> bytes:
    """Canonical CBOR header of an array of ``length`` items (major type 4)."""
    encoded = _cbor_uint(length)
    return bytes((0x80 | encoded[0],)) + encoded[1:]


def _token_bytes(tokens: Sequence[int]) -> tuple[bytes, int] | None:
    """``tokens`` packed as fixed-width unsigned ints (memo keys) and the width in bytes;
    ``None`` when they are not all plain ints below 2**64. Ids the tokenizer packed already
    (``array('I')``) are used as they are: the same bytes a list of them packs to."""
    if is_packed(tokens):
        return tokens.tobytes(), tokens.itemsize
    for code in ("I", "Q"):
        try:
            packed = array(code, tokens)
        except (OverflowError, TypeError):
            continue
        return packed.tobytes(), packed.itemsize
    return None


_CBOR_ARRAY3_BYTES32 = b"\x83\x58\x20"
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
    """Computes vLLM's chained block digests for token sequences under one configuration.

    ``memo_blocks`` bounds the block memo (0 turns it off). The memo is shared by everything
    using this hasher (the scorer and the KV-event self-check); it is safe to use from one
    event loop, and eviction is locked so concurrent threads cannot corrupt it.
    """

    def __init__(self, config: BlockHashConfig, *, memo_blocks: int = DEFAULT_MEMO_BLOCKS
                 ) -> None:
        self.config = config
        self.block_size = config.block_size
        self._cbor = config.algorithm == "sha256_cbor"
        self.none_hash = self.hash_object(config.seed)
        self._header = _cbor_array_header(config.block_size)
        self.memo_blocks = max(0, memo_blocks)
        self._chunk = max(1, MEMO_CHUNK_TOKENS // config.block_size)
        self._memo_entries = self.memo_blocks // self._chunk
        self._memo: dict[bytes, tuple[bytes, ...]] = {}
        self._memo_lock = threading.Lock()
        self.memo_hits = 0
        self.memo_misses = 0

    def hash_object(self, value: object) -> bytes:
        """``H(value)`` for the configured algorithm (vLLM's ``sha256_cbor`` / ``sha256``)."""
        if self._cbor:
            return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()
        return hashlib.sha256(pickle.dumps(value, protocol=PICKLE_PROTOCOL)).digest()

    def hash_block(self, parent: bytes | None, tokens: Sequence[int],
                   extra_keys: ExtraKeys | None = None) -> bytes:
        """Digest of one full block given its parent's digest (``None`` for the first block).

        Not memoised: the reference the chained paths are tested against."""
        parent_digest = parent if parent else self.none_hash
        if not self._cbor:
            payload = pickle.dumps((parent_digest, tuple(tokens), extra_keys),
                                   protocol=PICKLE_PROTOCOL)
            return hashlib.sha256(payload).digest()
        if len(parent_digest) != 32:
            return self.hash_object((parent_digest, tuple(tokens), extra_keys))
        tail = _CBOR_NULL if extra_keys is None else cbor2.dumps(extra_keys, canonical=True)
        payload = b"".join((_CBOR_ARRAY3_BYTES32, parent_digest,
                            _cbor_array_header(len(tokens)), *_encode_tokens(tokens), tail))
        return hashlib.sha256(payload).digest()

    def block_digests(self, tokens: Sequence[int], *, lora: tuple[str, str] | None = None,
                      cache_salt: str | None = None, max_blocks: int | None = None,
                      ) -> list[bytes]:
        """Chained digests of every full block of ``tokens`` (a trailing partial block is skipped).

        ``lora`` is ``(lora_name, lora_path)`` as the engine registered the adapter; both are
        hashed. ``cache_salt`` applies to the first block only (an empty salt counts as none, as
        in vLLM).
        """
        count = len(tokens) // self.block_size
        if max_blocks is not None:
            count = max(0, min(count, max_blocks))
        lora_keys: ExtraKeys = (("lora", lora[0], lora[1]),) if lora else ()
        first_keys = (*lora_keys, ("cache_salt", cache_salt)) if cache_salt else lora_keys
        return self.chain(None, tokens, count, first_keys=first_keys or None,
                          keys=lora_keys or None)

    def block_hashes(self, tokens: Sequence[int], *, lora: tuple[str, str] | None = None,
                     cache_salt: str | None = None, max_blocks: int | None = None) -> list[int]:
        """The uint64 event form of :meth:`block_digests`: what KV events name blocks by."""
        return to_event_ints(self.block_digests(tokens, lora=lora, cache_salt=cache_salt,
                                                max_blocks=max_blocks))

    def chain(self, parent: bytes | None, tokens: Sequence[int], count: int, *,
              first_keys: ExtraKeys | None = None, keys: ExtraKeys | None = None
              ) -> list[bytes]:
        """Digests of the first ``count`` full blocks of ``tokens`` chained after ``parent``
        (``None``: the prompt's start), block 0 with ``first_keys``, the others with ``keys``."""
        size = self.block_size
        count = min(count, len(tokens) // size)
        if count <= 0:
            return []
        parent_digest = parent if parent else self.none_hash
        if len(parent_digest) != 32:  # not a digest this hasher made: the reference path
            out: list[bytes] = []
            for index in range(count):
                parent_digest = self.hash_block(parent_digest, tokens[index * size:
                                                                      (index + 1) * size],
                                                first_keys if index == 0 else keys)
                out.append(parent_digest)
            return out
        digests: list[bytes] = []
        start = 0
        if first_keys != keys:  # block 0 differs (a salt): compute it on its own
            parent_digest = self._compute(parent_digest, tokens, 0, 1, first_keys)[0]
            digests.append(parent_digest)
            start = 1
        packed = None
        if keys is None and self._memo_entries and count - start >= self._chunk:
            packed = _token_bytes(tokens[:count * size])
        if packed is None:
            digests += self._compute(parent_digest, tokens, start, count, keys)
            return digests
        data, width = packed
        chunk = self._chunk
        step = width * size
        memo_get = self._memo.get
        index = start
        while index + chunk <= count:
            found = memo_get(parent_digest + data[index * step:(index + chunk) * step])
            if found is None:
                break
            digests += found
            parent_digest = found[-1]
            index += chunk
        self.memo_hits += index - start
        if index == count:
            return digests
        self.memo_misses += count - index
        new = self._compute(parent_digest, tokens, index, count, None)
        memo = self._memo
        for offset in range(0, len(new) - chunk + 1, chunk):
            block = index + offset
            memo[parent_digest + data[block * step:(block + chunk) * step]] = tuple(
                new[offset:offset + chunk])
            parent_digest = new[offset + chunk - 1]
        digests += new
        if len(memo) > self._memo_entries:
            self._evict()
        return digests

    def _compute(self, parent: bytes, tokens: Sequence[int], start: int, stop: int,
                 keys: ExtraKeys | None) -> list[bytes]:
        """Hash blocks ``start..stop-1`` of ``tokens`` after the 32-byte digest ``parent``."""
        size = self.block_size
        sha256 = hashlib.sha256
        out: list[bytes] = []
        append = out.append
        if not self._cbor:
            dumps = pickle.dumps
            for index in range(start, stop):
                parent = sha256(dumps((parent, tuple(tokens[index * size:(index + 1) * size]),
                                       keys), protocol=PICKLE_PROTOCOL)).digest()
                append(parent)
            return out
        data, offsets = _encode_blocks(tokens[start * size:stop * size], size)
        tail = _CBOR_NULL if keys is None else cbor2.dumps(keys, canonical=True)
        head, header, join = _CBOR_ARRAY3_BYTES32, self._header, b"".join
        for begin, end in itertools.pairwise(offsets):
            parent = sha256(join((head, parent, header, data[begin:end], tail))).digest()
            append(parent)
        return out

    def _evict(self) -> None:
        """Drop the oldest eighth of the memo (first in, first out)."""
        with self._memo_lock:
            memo = self._memo
            excess = len(memo) - self._memo_entries
            if excess <= 0:
                return
            drop = excess + self._memo_entries // 8
            for key in list(itertools.islice(memo, drop)):
                memo.pop(key, None)

    def memo_size(self) -> int:
        """Blocks memoised now."""
        return len(self._memo) * self._chunk
