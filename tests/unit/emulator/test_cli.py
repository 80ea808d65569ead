"""``kvroute engines --emulate`` and ``python -m kvroute_emulator`` options."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvroute_cli.main import build_parser
from kvroute_emulator.cli import config_from_args


def test_engines_emulate_options_build_the_fleet_config(model_dir: Path) -> None:
    args = build_parser().parse_args(["engines", "--emulate", "--count", "16", "--profile",
                                      "h100-llama8b", "--time-scale", "8", "--kv-blocks",
                                      "2000", "--max-model-len", "8192"])
    args.model_dir, args.served_model_name = str(model_dir), "m"
    config = config_from_args(args)
    assert (config.count, config.time_scale, config.max_model_len) == (16, 8.0, 8192)
    assert (config.profile.name, config.profile.kv_blocks, config.profile.block_size) == (
        "h100-llama8b", 2000, 16)


def test_a_fleet_that_cannot_hold_its_context_is_refused_with_the_fix(model_dir: Path
                                                                      ) -> None:
    args = build_parser().parse_args(["engines", "--emulate", "--profile", "h100-llama8b",
                                      "--kv-blocks", "100"])
    args.model_dir, args.served_model_name = str(model_dir), "m"
    with pytest.raises(SystemExit, match="lower max_model_len or raise kv_blocks"):
        config_from_args(args)
    args = build_parser().parse_args(["engines", "--emulate", "--profile", "a100"])
    args.model_dir, args.served_model_name = str(model_dir), "m"
    with pytest.raises(SystemExit, match="unknown profile"):
        config_from_args(args)
