"""The rate sweep's summary: goodput against a TTFT objective, per contender and rate."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from kvroute_bench import promtext, sweep
from kvroute_bench.contenders import CONTENDERS
from kvroute_bench.harness import ContenderResult, contender_result, skipped_result
from kvroute_bench.stats import RequestResult
from rich.console import Console


def _fleet() -> promtext.FleetDelta:
    return promtext.FleetDelta([promtext.EngineDelta(
        requests=4, prompt_tokens=400, generation_tokens=0, prefix_queries=400,
        prefix_hits=100, ttft_sum_s=1.0, ttft_count=4)])


def _run(name: str, ttfts: list[float]) -> ContenderResult:
    contender = CONTENDERS.select([name])[0]
    requests = [RequestResult(index=i, sent_s=float(i), first_token_s=i + t, done_s=i + t + 0.5,
                              output_tokens=8) for i, t in enumerate(ttfts)]
    return contender_result(contender, [requests], _fleet())


def test_goodput_counts_only_requests_within_the_objective() -> None:
    fast = _run("direct-rr", [0.1, 0.2, 0.3, 0.4])
    slow = _run("kvroute-precise-load", [0.1, 2.0, 3.0, 0.5])
    points = sweep.collect([(1.0, [fast, slow])], slo_ttft_s=1.0)
    by_name = {p.contender: p for p in points}
    window = fast.window_s
    assert by_name["direct-rr"].slo_attainment == 1.0
    assert by_name["direct-rr"].goodput_per_s == pytest.approx(4 / window)
    assert by_name["kvroute-precise-load"].slo_attainment == 0.5
    assert by_name["kvroute-precise-load"].goodput_per_s == pytest.approx(
        2 / slow.window_s)
    assert all(p.offered_rate == 1.0 for p in points)


def test_skipped_contenders_are_left_out_and_outputs_are_written(tmp_path: Path) -> None:
    skipped = skipped_result(CONTENDERS.select(["sglang-router-cache"])[0], "not installed")
    runs = [(1.0, [_run("direct-rr", [0.1] * 4), skipped]),
            (2.0, [_run("direct-rr", [0.1, 0.2, 5.0, 5.0]), skipped])]
    points = sweep.collect(runs, slo_ttft_s=1.0)
    assert [(p.contender, p.offered_rate) for p in points] == [("direct-rr", 1.0),
                                                               ("direct-rr", 2.0)]
    table = sweep.markdown(points, 1.0)
    assert "| 1 req/s offered | 2 req/s offered |" in table
    assert table.count("\n| direct-rr |") == 1
    written = sweep.write(points, {"workload": "chat", "engines": 2}, tmp_path, "chat", 1.0,
                          Console(file=io.StringIO()))
    assert [p.name for p in written] == ["chat-sweep.json", "chat-sweep.md", "chat-sweep.png"]
    data = json.loads((tmp_path / "chat-sweep.json").read_text())
    assert [p["slo_attainment"] for p in data["points"]] == [1.0, 0.5]
    assert (tmp_path / "chat-sweep.png").stat().st_size > 1000
    assert not math.isnan(points[1].goodput_per_s)
