"""The aiperf cross-check: the dataset it replays and the command that replays it."""

from __future__ import annotations

import json
from pathlib import Path

from kvroute_bench import crosscheck
from kvroute_bench.contenders import EngineInfo, FleetInfo
from kvroute_bench.workloads import build_params, generate

FLEET = FleetInfo([EngineInfo(f"engine-{i}", f"http://127.0.0.1:{8100 + i}", "tcp://a", "tcp://b")
                   for i in range(2)], "kvroute-test-model", 32, Path("/models/test"))


def test_dataset_keeps_prompts_lengths_and_relative_times(tmp_path: Path) -> None:
    trace = generate(build_params("rag", requests=12))
    measured = trace.requests[4:]
    path = crosscheck.write_dataset(measured, tmp_path / "d.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(measured)
    assert rows[0]["timestamp"] == 0.0
    assert rows[-1]["timestamp"] == round((measured[-1].arrival_s - measured[0].arrival_s)
                                          * 1000, 3)
    assert [r["text"] for r in rows] == [m.prompt for m in measured]
    assert [r["output_length"] for r in rows] == [m.max_tokens for m in measured]


def test_command_replays_on_every_engine_with_our_sampling(tmp_path: Path) -> None:
    argv = crosscheck.command(FLEET, tmp_path / "d.jsonl", tmp_path / "out", 50,
                              [tmp_path / "bin"])
    assert argv[1] == "profile" and "--fixed-schedule" in argv and "--streaming" in argv
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--url"] == [
        e.url for e in FLEET.engines]
    assert json.loads(argv[argv.index("--extra-inputs") + 1]) == {
        "ignore_eos": True, "temperature": 0.0}
    assert argv[argv.index("--tokenizer") + 1] == "/models/test"


def test_export_percentiles_are_read_in_seconds() -> None:
    data = {"time_to_first_token": {"unit": "ms", "p50": 120.0, "p90": 300.0, "avg": 150.0},
            "request_latency": {"unit": "ms", "p99": 2000.0},
            "request_count": {"unit": "requests", "avg": 50}}
    out = crosscheck.read_export(data)
    assert out == {"ttft_p50_s": 0.12, "ttft_p90_s": 0.3, "ttft_avg_s": 0.15, "e2e_p99_s": 2.0,
                   "requests": 50}
