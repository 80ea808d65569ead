"""Benchmark: tokenise + block-hash one 4k-token prompt, the per-request cost of precise routing.

Uses the test model's byte-level tokenizer (one byte = one token, so a 4,096-character prompt is
4,096 tokens) and, when ``--tokenizer-dir`` names another model folder, that tokenizer instead.

Cases, each measured per prompt in CPU time of this process (``time.process_time``, which also
counts a tokenizer worker thread, if any: what the request itself costs, not how long other
load on the machine kept it waiting) and wall time:

* ``cold``: a prompt never seen (tokenisation cache and block memo miss) — tokenise, hash, both;
* ``repeat``: the same prompt again (cache and memo hit);
* ``extended``: the prompt plus 256 new characters (the next chat turn: the text is tokenised
  again, the old blocks come from the memo, 16 new blocks are hashed);
* ``ids, vocab N``: a token-id prompt drawn from a real-sized vocabulary (the byte-level test
  tokenizer only produces ids below 260, which encode in 1-2 bytes);
* ``shared context``: the precise-prefix workload's shape — every prompt of a round starts
  with the same ``--context`` characters (a tenant's context) and ends with a new question of
  ``--question`` characters (the context's pieces and blocks come from the caches, the
  question is tokenised and hashed);
* every case tokenises as the router does (``tokenize_request`` of a parsed request: the ids
  it hands the hasher are packed, ``array('I')``);
* references in the same run: ``Tokenizer.encode`` (with offsets, the previous code), hashing
  without the memo, and hashing each block with ``cbor2`` instead of the hand-written encoder.

Every case runs ``--rounds`` rounds over fresh prompts; the report gives each round's median and
the median over rounds (the machine is shared, so single rounds can be disturbed).

    python bench/tokenize_hash.py [--tokens 4096] [--block-size 16] [--iterations 200] [--rounds 5]
                                  [--context 6000] [--question 1200]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import random
import statistics
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
from kvroute_cli.testmodel import build_test_model
from kvroute_router.kvevents.hashing import BlockHashConfig, BlockHasher, to_event_ints
from kvroute_router.kvevents.tokenization import PromptTokenizer
from kvroute_router.openai.requests import OpenAIRequest, parse_request


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cbor2_block_hashes(hasher: BlockHasher, tokens: list[int]) -> list[int]:
    """The reference encoder: ``cbor2.dumps`` of every block's tuple."""
    size = hasher.block_size
    parent = hasher.none_hash
    digests = []
    for start in range(0, len(tokens) - size + 1, size):
        parent = hashlib.sha256(cbor2.dumps((parent, tuple(tokens[start:start + size]), None),
                                            canonical=True)).digest()
        digests.append(parent)
    return to_event_ints(digests)


def completion(prompt: str) -> OpenAIRequest:
    """A parsed completions request (parsed outside the timed part, as the router parses each
    request once before routing it)."""
    return parse_request({"model": "-", "prompt": prompt}, "completions")


def timed(samples: dict[str, list[tuple[float, float]]], label: str,
          action: Callable[[], Any]) -> Any:
    c0, w0 = time.process_time(), time.perf_counter()
    result = action()
    samples.setdefault(label, []).append(((time.process_time() - c0) * 1e3,
                                          (time.perf_counter() - w0) * 1e3))
    return result


def one_prompt(samples: dict[str, list[tuple[float, float]]], tokenizer: PromptTokenizer,
               hasher: BlockHasher, plain: BlockHasher, prompt: str, turn: str,
               algorithm: str) -> None:
    """Every case for one new prompt (and its next turn), checking they agree."""

    request, next_turn = completion(prompt), completion(turn)

    def cold() -> list[int]:
        tokens = timed(samples, "cold: tokenise",
                       lambda: tokenizer.tokenize_request(request) or [])
        hashes: list[int] = timed(samples, "cold: hash", lambda: hasher.block_hashes(tokens))
        return hashes

    expected = timed(samples, "cold: tokenise+hash", cold)
    again = timed(samples, "repeat: tokenise+hash", lambda: hasher.block_hashes(
        tokenizer.tokenize_request(request) or []))
    timed(samples, "extended: tokenise+hash", lambda: hasher.block_hashes(
        tokenizer.tokenize_request(next_turn) or []))
    tokens = tokenizer.encode_uncached(prompt, True)
    timed(samples, "ref: Tokenizer.encode (offsets)",
          lambda: tokenizer.tokenizer.encode(prompt, add_special_tokens=True).ids)
    without_memo = timed(samples, "ref: hash without memo", lambda: plain.block_hashes(tokens))
    if algorithm == "sha256_cbor":
        by_cbor2 = timed(samples, "ref: hash with cbor2 per block",
                         lambda: cbor2_block_hashes(plain, tokens))
        assert by_cbor2 == expected
    assert again == expected == without_memo
    samples["prompt tokens"] = [(float(len(tokens)), 0.0)]


def one_round(args: argparse.Namespace, directory: Path, rng: random.Random
              ) -> dict[str, list[tuple[float, float]]]:
    tokenizer = PromptTokenizer.from_directory(directory)
    config = BlockHashConfig(args.block_size, args.algorithm)
    hasher = BlockHasher(config)
    plain = BlockHasher(config, memo_blocks=0)
    alphabet = string.ascii_letters + " "
    samples: dict[str, list[tuple[float, float]]] = {}
    context = "".join(rng.choice(alphabet) for _ in range(args.context))
    for _ in range(args.iterations):
        text = context + "".join(rng.choice(alphabet) for _ in range(args.question))
        shared = timed(samples, "shared context: tokenise+hash", functools.partial(
            lambda r: hasher.block_hashes(tokenizer.tokenize_request(r) or []),
            completion(text)))
        assert shared == plain.block_hashes(tokenizer.encode_uncached(text, True))
        prompt = "".join(rng.choice(alphabet) for _ in range(args.tokens))
        turn = prompt + "".join(rng.choice(alphabet) for _ in range(256))
        one_prompt(samples, tokenizer, hasher, plain, prompt, turn, args.algorithm)
        ids = [rng.randrange(args.vocab) for _ in range(args.tokens)]
        big = timed(samples, f"ids, vocab {args.vocab}: hash",
                    functools.partial(hasher.block_hashes, ids))
        if args.algorithm == "sha256_cbor":
            assert big == timed(samples, f"ids, vocab {args.vocab}: ref cbor2",
                                functools.partial(cbor2_block_hashes, plain, ids))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--algorithm", choices=["sha256_cbor", "sha256"], default="sha256_cbor")
    parser.add_argument("--iterations", type=int, default=200, help="prompts per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--context", type=int, default=6000,
                        help="characters of the context every 'shared context' prompt starts with")
    parser.add_argument("--question", type=int, default=1200,
                        help="characters of each 'shared context' prompt's new question")
    parser.add_argument("--tokenizer-dir", type=Path)
    parser.add_argument("--vocab", type=int, default=152_064,
                        help="vocabulary of the token-id case (Qwen2's by default)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    directory = args.tokenizer_dir or build_test_model(Path(tempfile.mkdtemp()) / "model")
    rng = random.Random(7)
    rounds = [one_round(args, directory, rng) for _ in range(args.rounds)]
    tokens = rounds[0].pop("prompt tokens")[0][0]
    print(f"prompt tokens {tokens:.0f}, block size {args.block_size}, {args.algorithm}, "
          f"{args.rounds} rounds x {args.iterations} prompts; ms, CPU time (wall in brackets)")
    summary: dict[str, Any] = {}
    for label in rounds[0]:
        if label == "prompt tokens":
            continue
        cpu_medians = [statistics.median(c for c, _ in r[label]) for r in rounds]
        wall_medians = [statistics.median(w for _, w in r[label]) for r in rounds]
        cpu_p99 = [percentile([c for c, _ in r[label]], 0.99) for r in rounds]
        summary[label] = {"cpu_median_ms": statistics.median(cpu_medians),
                          "cpu_round_medians_ms": cpu_medians,
                          "cpu_p99_ms": statistics.median(cpu_p99),
                          "wall_median_ms": statistics.median(wall_medians)}
        print(f"{label:>32}: median {statistics.median(cpu_medians):.3f} "
              f"({statistics.median(wall_medians):.3f}); per round "
              f"{' '.join(f'{m:.3f}' for m in cpu_medians)}; p99 "
              f"{statistics.median(cpu_p99):.3f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
