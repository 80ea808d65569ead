"""``bench/overhead_sweep.py`` at toy sizes: every cell, table, plot and memory row is produced,
and the precise cells really score from the KV-event index (not the approximate fallback)."""

from __future__ import annotations

import json
from pathlib import Path

import overhead_sweep as sweep
import pytest

TINY = ["--endpoints", "8,16", "--prompt-tokens", "256", "--iterations", "4",
        "--grpc-iterations", "2", "--rounds", "2", "--warm-requests", "32",
        "--fill-blocks", "64", "--memory-blocks", "1000", "--no-base", "--quiet"]


def test_tiny_sweep_writes_report_json_and_plot(tmp_path: Path) -> None:
    md = tmp_path / "router-overhead.md"
    assert sweep.main([*TINY, "--write", str(md)]) == 0

    results = json.loads((tmp_path / "router-overhead-sweep.json").read_text())
    png = (tmp_path / "router-overhead-sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert results["command"].startswith("python bench/overhead_sweep.py --endpoints 8,16")

    cells = results["cells"]
    assert sorted((c["scorer"], c["endpoints"], c["prompt_tokens"]) for c in cells) == [
        ("approx", 8, 256), ("approx", 16, 256), ("precise", 8, 256), ("precise", 16, 256)]
    for cell in cells:
        assert cell["rounds"] == 2 and cell["iterations"] == 4 and cell["grpc_iterations"] == 2
        assert len(cell["round_wall_p50_us"]) == len(cell["round_grpc_p50_us"]) == 2
        assert 0 < cell["wall_p50_us"] <= cell["wall_p99_us"]
        assert 0 < cell["cpu_p50_us"] <= cell["cpu_p99_us"]
        assert 0 < cell["grpc_p50_us"] <= cell["grpc_p99_us"]
        assert cell["decisions_per_cpu_s"] > 0 and cell["index_entries"] > 0
        assert 0.0 <= cell["match_ratio_mean"] <= 1.0
        if cell["scorer"] == "precise":
            # every endpoint trusted: all scored from the index, which the synthetic
            # BlockStored events filled to --fill-blocks per endpoint; picks mostly land on a
            # holder of the tenant's prefix (3/4 of the prompt; load scorers may overrule)
            assert cell["precise_scored_share"] == 1.0
            assert cell["index_entries"] >= 64 * cell["endpoints"]
            assert cell["match_ratio_mean"] > 0.3
        else:
            assert cell["precise_scored_share"] is None

    memory = results["memory"]
    assert [(m["index"], m["entries"]) for m in memory] == [("approx", 1000),
                                                             ("precise", 1000)]
    for row in memory:
        assert row["distinct_blocks"] == 500
        assert 20 < row["bytes_per_entry"] < 2000  # an index, not the event payloads

    text = md.read_text()
    assert "## Sweep: endpoints, prompt length, prefix scorer" in text
    assert "## Index memory vs blocks tracked" in text
    assert "![latency vs endpoints](router-overhead-sweep.png)" in text
    assert "## Machine and run" in text and "### How it scales" in text
    assert results["source"].keys() == {"commit", "router_modified"}
    scaling = [line for line in text.splitlines() if line.startswith(("| approx | 256 |",
                                                                       "| precise | 256 |"))]
    assert len(scaling) == 2 and all("x endpoints" in line for line in scaling)

    # re-rendering from the JSON measures nothing and gives the same page
    md.unlink()
    assert sweep.main(["--from-json", str(tmp_path / "router-overhead-sweep.json"),
                       "--write", str(md)]) == 0
    assert md.read_text() == text
    table_rows = [line for line in text.splitlines() if line.startswith(("| 8 |", "| 16 |"))]
    assert len(table_rows) == 4  # one per (scorer, endpoints, prompt length)


def test_unknown_scorer_is_refused() -> None:
    with pytest.raises(SystemExit):
        sweep.parse_args(["--scorers", "approx,exact"])


def test_memory_chains_add_up_to_the_entries_asked_for() -> None:
    for entries in (1, 63, 64, 129, 1000):
        chains = sweep._chains(entries, 8, seed=1)
        assert sum(len(h) * len(holders) for h, holders in chains) == entries
        assert all(len(set(holders)) == len(holders) for _, holders in chains)
