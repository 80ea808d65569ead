"""Cost and capacity profiles for simulated engines.

A step of a simulated engine costs ``step_base_s`` + ``prefill_s_per_token`` * (prompt tokens
computed in the step) + the decode cost of the step's decoding sequences, interpolated from
``decode_step_s_by_batch`` (batch size → seconds for one decode step of that many sequences).
Cached prompt tokens cost nothing: that is the whole point of prefix-aware routing.

Two profiles ship:

* :func:`cpu_test_engine` — the vLLM-CPU test engines of ``kvroute bench`` on this 2-core
  machine. Prefill from the measurements in docs/design.md and the benchmark logs (a cold
  ~2,400-token prefill ≈ 1 s, the same prompt cached ≈ 0.07 s); decode from the benchmark's
  own e2e - TTFT over output tokens (hand-fitted to run 1, see ``docs/benchmarks/README.md``;
  an automatic fit is still to be written).
* :func:`h100_llama8b` — an 8B Llama on one H100. Prefill from the measured file
  ``../shared/data/calibration/h100-llama8b-shape.json`` (≈ 32k prompt tokens/s at ≥ 2k
  tokens; a 256-token suffix after a cached prefix ≈ 44 ms, of which ~38 ms is the eager-mode
  floor that the file's batch-1 decode step also shows, so the fixed step cost left for vLLM
  is ~0). That file's decode numbers are eager-mode PyTorch, not vLLM, so decode comes from
  published vLLM figures instead: vLLM's performance blog for v0.6.0 (Sept. 2024) reports
  Llama-3-8B on one H100 serving at ~5-10 ms per output token at low to moderate batch; the
  table below uses
  7 ms at batch 1 rising to 20 ms at batch 256, a memory-bandwidth-bound shape. These are
  stated assumptions, not measurements of ours.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class CostProfile:
    """How long a simulated engine's steps take and how much it can hold."""

    name: str
    prefill_s_per_token: float
    step_base_s: float
    decode_step_s_by_batch: dict[int, float] = field(default_factory=dict)
    max_num_seqs: int = 256
    max_batched_tokens: int = 2048
    block_size: int = 32
    kv_blocks: int = 4096

    def decode_step_s(self, batch: int) -> float:
        """Seconds of one decode step of ``batch`` sequences (linear between table points)."""
        if batch <= 0 or not self.decode_step_s_by_batch:
            return 0.0
        sizes = sorted(self.decode_step_s_by_batch)
        if batch <= sizes[0]:
            return self.decode_step_s_by_batch[sizes[0]]
        if batch >= sizes[-1]:
            last, before = sizes[-1], sizes[-2] if len(sizes) > 1 else sizes[-1]
            slope = ((self.decode_step_s_by_batch[last] - self.decode_step_s_by_batch[before])
                     / (last - before)) if last != before else 0.0
            return self.decode_step_s_by_batch[last] + slope * (batch - last)
        i = bisect.bisect_left(sizes, batch)
        lo, hi = sizes[i - 1], sizes[i]
        frac = (batch - lo) / (hi - lo)
        return (self.decode_step_s_by_batch[lo]
                + frac * (self.decode_step_s_by_batch[hi] - self.decode_step_s_by_batch[lo]))

    def step_s(self, prefill_tokens: int, decoding: int) -> float:
        """Seconds of one engine step computing ``prefill_tokens`` and decoding ``decoding``."""
        if prefill_tokens <= 0 and decoding <= 0:
            return 0.0
        return (self.step_base_s + self.prefill_s_per_token * prefill_tokens
                + self.decode_step_s(decoding))


def cpu_test_engine(kv_blocks: int = 384) -> CostProfile:
    """The byte-level test model on vLLM-CPU, 2 shared cores (see the module docstring)."""
    return CostProfile(
        name="cpu-test-engine",
        # (1.0 s - 0.07 s) / ~2,370 uncached tokens
        prefill_s_per_token=0.00039,
        # Run 1 (chat, docs/benchmarks/results/chat.json): e2e p50 - TTFT p50 over ~28
        # output tokens is 5-9 ms per token at 1-4 concurrent sequences.
        step_base_s=0.004,
        decode_step_s_by_batch={1: 0.003, 4: 0.005, 32: 0.02},
        max_num_seqs=256, max_batched_tokens=2048, block_size=32, kv_blocks=kv_blocks)


def h100_llama8b(calibration: Path, kv_blocks: int = 30_000) -> CostProfile:
    """An 8B Llama on one H100: prefill from ``calibration``, decode from published figures."""
    data = json.loads(calibration.read_text())
    rates = data["prefill_tokens_per_s_by_prompt_tokens"]
    # Long prompts are matmul-bound: use the rate at >= 2k tokens.
    long_rates = [float(v) for k, v in rates.items() if int(k) >= 2048]
    per_token = 1.0 / (sum(long_rates) / len(long_rates))
    suffix = data["suffix_256_tokens_after_cached_prefix_ms"]
    suffix_s = min(float(v) for v in suffix.values()) / 1000.0
    # That suffix time holds the same eager-mode Python floor as the file's decode steps
    # (~38 ms at batch 1), which vLLM's CUDA graphs do not pay: take it out of the step base.
    eager_floor_s = float(data["decode_step_ms_eager_by_batch_ctx1024"]["1"]) / 1000.0
    base = max(0.0, suffix_s - 256 * per_token - eager_floor_s)
    return CostProfile(
        name="h100-llama8b",
        prefill_s_per_token=per_token, step_base_s=base,
        decode_step_s_by_batch={1: 0.007, 32: 0.009, 64: 0.011, 128: 0.014, 256: 0.020},
        max_num_seqs=256, max_batched_tokens=8192, block_size=16, kv_blocks=kv_blocks)


# h100_llama8b(CALIBRATION) evaluated once, so the emulator needs no file from outside the
# repository: the mean prefill rate at >= 2k tokens (32,609, 32,925, 31,480 tokens/s) and a
# step base of 0 (tests/unit/emulator/test_profiles.py re-derives both when the file exists).
H100_PREFILL_S_PER_TOKEN = 3.0 / (32_609 + 32_925 + 31_480)


def h100_llama8b_builtin(kv_blocks: int = 30_000) -> CostProfile:
    """:func:`h100_llama8b` with the calibration file's numbers built in."""
    return CostProfile(
        name="h100-llama8b",
        prefill_s_per_token=H100_PREFILL_S_PER_TOKEN, step_base_s=0.0,
        decode_step_s_by_batch={1: 0.007, 32: 0.009, 64: 0.011, 128: 0.014, 256: 0.020},
        max_num_seqs=256, max_batched_tokens=8192, block_size=16, kv_blocks=kv_blocks)


PROFILE_NAMES = ("h100-llama8b", "cpu")


def profile_from_file(path: Path) -> CostProfile:
    """A profile from JSON: :class:`CostProfile`'s fields (``decode_step_s_by_batch`` keys are
    batch sizes as strings)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a profile is a JSON object of CostProfile's fields")
    known = set(CostProfile.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown profile fields {unknown}; known: {sorted(known)}")
    table = data.pop("decode_step_s_by_batch", {})
    return CostProfile(**{"name": path.stem, **data},
                       decode_step_s_by_batch={int(k): float(v) for k, v in table.items()})


def named_profile(spec: str, kv_blocks: int = 0, block_size: int = 0) -> CostProfile:
    """``h100-llama8b``, ``cpu`` or a JSON file; ``kv_blocks``/``block_size`` override (0: the
    profile's own)."""
    if spec == "h100-llama8b":
        profile = h100_llama8b_builtin()
    elif spec == "cpu":
        profile = cpu_test_engine()
    elif Path(spec).is_file():
        profile = profile_from_file(Path(spec))
    else:
        raise ValueError(f"unknown profile {spec!r}: use {', '.join(PROFILE_NAMES)} or a JSON "
                         "file of CostProfile fields")
    return replace(profile, kv_blocks=kv_blocks or profile.kv_blocks,
                   block_size=block_size or profile.block_size)
