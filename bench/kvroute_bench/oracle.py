"""The oracle's prefix-cache hit rate of a trace: every distinct block computed once, fleet-wide.

A router can do no better than an oracle with one infinite cache shared by the whole fleet:
each distinct full block (identified by its chain of tokens, as vLLM's block hashes are) is
computed the first time any request needs it and hit ever after. The measured window's hit rate
under that oracle, with the warm-up requests' blocks already computed, is the ceiling for the
engines' own hit rate (``vllm:prefix_cache_hits / queries`` over the same window). As in vLLM,
at least the prompt's last token is always computed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from kvroute_bench.workloads import TraceRequest

Tokenize = Callable[[TraceRequest], list[int]]


def byte_tokens(request: TraceRequest) -> list[int]:
    """The test model's tokenization of a completion prompt: one token per byte."""
    return list(request.prompt.encode())


def served_model_tokenizer(model_dir: str, name: str) -> Tokenize:
    """Tokens as the served model's engines count them (chat template for chat requests)."""
    from pathlib import Path

    from kvroute_emulator.tokens import ServedModel

    model = ServedModel.load(Path(model_dir), name, max_model_len=1 << 30)

    def tokenize(request: TraceRequest) -> list[int]:
        if request.messages is not None:
            return model.encode_chat([{"role": r, "content": c} for r, c in request.messages])
        return model.encode_prompt(request.prompt)

    return tokenize


def _chain(tokens: list[int], block_size: int) -> list[bytes]:
    out: list[bytes] = []
    parent = b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tokens[start:start + block_size]
        parent = hashlib.blake2b(parent + repr(block).encode(), digest_size=16).digest()
        out.append(parent)
    return out


def oracle_hit_rate(requests: Sequence[TraceRequest], warmup: int, block_size: int,
                    tokenize: Tokenize = byte_tokens) -> float:
    """Hit tokens / prompt tokens over ``requests[warmup:]`` under the oracle."""
    seen: set[bytes] = set()
    hits = queries = 0
    for position, request in enumerate(requests):
        tokens = tokenize(request)
        chain = _chain(tokens, block_size)
        hit_blocks = 0
        for digest in chain:
            if digest not in seen:
                break
            hit_blocks += 1
        if hit_blocks * block_size >= len(tokens):
            hit_blocks = max(0, (len(tokens) - 1) // block_size)
        seen.update(chain)
        if position >= warmup:
            queries += len(tokens)
            hits += hit_blocks * block_size
    return hits / queries if queries else 0.0
