"""Golden tests: kvroute's block hashes equal vLLM's own, computed by the installed vllm.

vLLM is only installed in the engine venv, so one subprocess per seed setting
(``vllm_hash_oracle.py``) hashes every case with vLLM's ``get_request_block_hasher`` over a real
``Request``; the cases are seeded-random token sequences across block sizes, both algorithms,
LoRA adapters and cache salts. Skipped when no engine interpreter is configured or found.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kvroute_router.kvevents.hashing import (
    BlockHashConfig,
    BlockHasher,
    HashAlgorithm,
    resolve_seed,
    to_event_int,
)

pytestmark = pytest.mark.vllm

ORACLE = Path(__file__).with_name("vllm_hash_oracle.py")


def engine_python() -> str:
    """vLLM's interpreter: $KVROUTE_ENGINE_PYTHON (scripts/test.sh exports it), else the engine
    venv ``scripts/kvenv.sh engine`` finds or builds: never skipped, since this is the only
    check that the router's block hashes are vLLM's."""
    from kvroute_cli.localengines import engine_python as configured_engine_python

    return configured_engine_python()


def golden_cases(count: int, rng: random.Random) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = [
        {"algorithm": "sha256_cbor", "block_size": 16, "tokens": list(range(1, 33))},
        {"algorithm": "sha256_cbor", "block_size": 16, "tokens": list(range(1, 33)),
         "cache_salt": ""},
    ]
    for number in range(count):
        algorithm: HashAlgorithm = "sha256_cbor" if number % 3 else "sha256"
        block_size = rng.choice([1, 2, 7, 16, 23, 24, 32, 64, 255, 256, 300])
        length = rng.randrange(0, block_size * 6 + 3)
        # Token ids across every CBOR/pickle integer width, including large vocabularies.
        width = rng.choice([23, 24, 255, 256, 65_535, 65_536, 262_144, 2**32 + 5])
        case: dict[str, Any] = {"algorithm": algorithm, "block_size": block_size,
                                "tokens": [rng.randrange(0, width) for _ in range(length)]}
        if rng.random() < 0.3:
            case["lora_name"] = rng.choice(["sql-adapter", "é-ünicode", "x" * 40])
            case["lora_path"] = rng.choice(["/adapters/sql", "s3://bucket/a", "/a"])
        if rng.random() < 0.3:
            case["cache_salt"] = rng.choice(["tenant-a", "salt with spaces", "ß" * 30])
        cases.append(case)
    # Extensions of earlier prompts (the next chat turn): a shared hasher serves their first
    # blocks from its memo, and the result must still be vLLM's.
    for number in range(count // 10):
        base = cases[2 + number]
        extra = [rng.randrange(0, 65_536) for _ in range(rng.randrange(0, 3 * base["block_size"]))]
        cases.append({**base, "tokens": base["tokens"] + extra})
    return cases


def run_oracle(cases: list[dict[str, Any]], python_hash_seed: str | None) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHASHSEED", "PYTHONPATH")}
    if python_hash_seed is not None:
        env["PYTHONHASHSEED"] = python_hash_seed
    done = subprocess.run([engine_python(), str(ORACLE)], input=json.dumps(cases), text=True,
                          capture_output=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result: list[list[str]] = json.loads(done.stdout)
    return result


def ours(case: dict[str, Any], seed: str,
         shared: dict[BlockHashConfig, BlockHasher] | None = None) -> list[str]:
    """Our digests; with ``shared``, one memoising hasher per configuration across cases."""
    config = BlockHashConfig(block_size=case["block_size"], algorithm=case["algorithm"],
                             seed=seed)
    hasher = (BlockHasher(config) if shared is None
              else shared.setdefault(config, BlockHasher(config)))
    lora = (case["lora_name"], case.get("lora_path", "")) if case.get("lora_name") else None
    return [d.hex() for d in hasher.block_digests(case["tokens"], lora=lora,
                                                  cache_salt=case.get("cache_salt"))]


@pytest.mark.parametrize("python_hash_seed", [None, "1234"])
def test_block_hashes_match_vllm(python_hash_seed: str | None) -> None:
    cases = golden_cases(150, random.Random(20240604))
    expected = run_oracle(cases, python_hash_seed)
    seed = resolve_seed(python_hash_seed)
    mismatches = [(number, case["algorithm"], case["block_size"])
                  for number, (case, want) in enumerate(zip(cases, expected, strict=True))
                  if ours(case, seed) != want]
    assert not mismatches, f"cases differing from vLLM (index, algorithm, block size): {mismatches}"
    shared: dict[BlockHashConfig, BlockHasher] = {}
    for attempt in ("cold memo", "warm memo"):
        memoised = [number for number, (case, want) in enumerate(zip(cases, expected, strict=True))
                    if ours(case, seed, shared) != want]
        assert not memoised, f"{attempt}: cases differing from vLLM: {memoised}"
    assert sum(h.memo_hits for h in shared.values()) > 0
    # The docs/design.md vector, as vLLM computed it here, in event form.
    assert [to_event_int(bytes.fromhex(h)) for h in expected[0]] == (
        [8866452693264111234, 807986237951177663] if python_hash_seed is None else
        [to_event_int(bytes.fromhex(h)) for h in ours(cases[0], seed)])
