"""Benchmark: tokenise + block-hash one 4k-token prompt, the per-request cost of precise routing.

Uses the test model's byte-level tokenizer (one byte = one token, so a 4,096-character prompt is
4,096 tokens) and, when ``--tokenizer-dir`` names another model folder, that tokenizer instead.
Every iteration uses a *different* prompt, so the tokenisation cache never hits; the cached case
is measured separately. Prints median and p99 per phase.

    python bench/tokenize_hash.py [--tokens 4096] [--block-size 16] [--iterations 300]
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import tempfile
import time
from pathlib import Path

from kvroute_cli.testmodel import build_test_model
from kvroute_router.kvevents.hashing import BlockHashConfig, BlockHasher
from kvroute_router.kvevents.tokenization import PromptTokenizer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--algorithm", choices=["sha256_cbor", "sha256"], default="sha256_cbor")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--tokenizer-dir", type=Path)
    args = parser.parse_args()
    directory = args.tokenizer_dir or build_test_model(Path(tempfile.mkdtemp()) / "model")
    tokenizer = PromptTokenizer.from_directory(directory)
    hasher = BlockHasher(BlockHashConfig(args.block_size, args.algorithm))
    rng = random.Random(7)
    alphabet = string.ascii_letters + " "
    prompts = ["".join(rng.choice(alphabet) for _ in range(args.tokens))
               for _ in range(args.iterations)]
    tokenize_ms, hash_ms, total_ms, cached_ms = [], [], [], []
    counts = []
    for prompt in prompts:
        start = time.perf_counter()
        tokens = tokenizer.tokenize("completions", {"prompt": prompt}) or []
        middle = time.perf_counter()
        hasher.block_hashes(tokens)
        end = time.perf_counter()
        counts.append(len(tokens))
        tokenize_ms.append((middle - start) * 1e3)
        hash_ms.append((end - middle) * 1e3)
        total_ms.append((end - start) * 1e3)
        again = time.perf_counter()
        hasher.block_hashes(tokenizer.tokenize("completions", {"prompt": prompt}) or [])
        cached_ms.append((time.perf_counter() - again) * 1e3)
    print(f"prompt tokens {statistics.median(counts):.0f}, block size {args.block_size}, "
          f"{args.algorithm}, {args.iterations} prompts")
    for label, values in (("tokenise", tokenize_ms), ("hash", hash_ms),
                          ("tokenise+hash", total_ms), ("cached tokens+hash", cached_ms)):
        print(f"{label:>20}: median {statistics.median(values):.3f} ms, "
              f"p99 {percentile(values, 0.99):.3f} ms")


if __name__ == "__main__":
    main()
