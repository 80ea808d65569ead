"""vLLM's prefix-cache block hashes with ``--prefix-caching-hash-algo sha256_cbor``.

Block *i* of a prompt is ``sha256(cbor_canonical([parent, tokens_of_block_i, extra]))`` where
``parent`` is the previous block's 32-byte digest (the first block's parent is
``sha256(cbor("vllm-none-hash"))``, or of ``$PYTHONHASHSEED`` when that is set, as in vLLM) and
``extra`` is ``None`` without LoRA or cache salt. Only full blocks are hashed. KV events carry
each hash as an unsigned 64-bit integer: the digest's last 8 bytes, big-endian.

The e2e fidelity test (``tests/e2e/test_emulator_fidelity.py``) checks these against a real
vLLM-CPU engine's ``BlockStored`` events.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import cbor2


def none_hash() -> bytes:
    """The parent digest of a prompt's first block."""
    seed = os.environ.get("PYTHONHASHSEED")
    source: object = seed if seed else "vllm-none-hash"
    return hashlib.sha256(cbor2.dumps(source, canonical=True)).digest()


def block_digests(tokens: Sequence[int], block_size: int,
                  extra: object | None = None) -> list[bytes]:
    """The 32-byte digests of the full blocks of ``tokens``, chained."""
    digests: list[bytes] = []
    parent = none_hash()
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = list(tokens[start:start + block_size])
        parent = hashlib.sha256(cbor2.dumps([parent, block, extra], canonical=True)).digest()
        digests.append(parent)
    return digests


def event_hash(digest: bytes) -> int:
    """How a KV event names a block: the digest's last 8 bytes as an unsigned integer."""
    return int.from_bytes(digest[-8:], "big")


def block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """The KV-event integers of the full blocks of ``tokens``."""
    return [event_hash(d) for d in block_digests(tokens, block_size)]
