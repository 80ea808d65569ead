"""vLLM's sha256_cbor block hashes and the built-in H100 profile."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvroute_emulator.hashing import block_hashes
from kvroute_emulator.model.profile import (
    h100_llama8b,
    h100_llama8b_builtin,
    named_profile,
    profile_from_file,
)

CALIBRATION = next(
    (p / "shared" / "data" / "calibration" / "h100-llama8b-shape.json"
     for p in Path(__file__).resolve().parents
     if (p / "shared" / "data" / "calibration" / "h100-llama8b-shape.json").exists()),
    Path("/nonexistent"))


def test_sha256_cbor_matches_vllms_test_vector() -> None:
    # DESIGN.md: tokens 1..32, block size 16, as a real vLLM-CPU engine's BlockStored names them
    assert block_hashes(list(range(1, 33)), 16) == [8866452693264111234, 807986237951177663]


def test_only_full_blocks_are_hashed_and_chains_share_prefixes() -> None:
    a = block_hashes(list(range(40)), 16)
    b = block_hashes([*range(32), 99, 98], 16)
    assert len(a) == 2 and a == b  # the partial third block is not hashed
    c = block_hashes([*range(16), *range(100, 116)], 16)
    assert c[0] == a[0] and c[1] != a[1]


@pytest.mark.skipif(not CALIBRATION.exists(), reason="calibration file not on this machine")
def test_builtin_h100_profile_is_the_calibrated_one() -> None:
    assert h100_llama8b_builtin() == h100_llama8b(CALIBRATION)


def test_profiles_by_name_and_file(tmp_path: Path) -> None:
    assert named_profile("h100-llama8b", kv_blocks=100).kv_blocks == 100
    assert named_profile("cpu", block_size=16).block_size == 16
    path = tmp_path / "mine.json"
    path.write_text('{"prefill_s_per_token": 0.001, "step_base_s": 0.002, '
                    '"decode_step_s_by_batch": {"1": 0.01}, "kv_blocks": 64}')
    profile = profile_from_file(path)
    assert (profile.name, profile.decode_step_s_by_batch, profile.kv_blocks) == (
        "mine", {1: 0.01}, 64)
    path.write_text('{"prefill_s_per_token": 0.001, "step_base_s": 0, "bogus": 1}')
    with pytest.raises(ValueError, match="bogus"):
        profile_from_file(path)
    with pytest.raises(ValueError, match="unknown profile"):
        named_profile("a100")
