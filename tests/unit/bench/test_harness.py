"""Turning a measured window into a contender's result, and the JSON written for it."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from kvroute_bench import promtext
from kvroute_bench.contenders import CONTENDERS
from kvroute_bench.harness import (
    Measurement,
    aggregate,
    contender_result,
    skipped_result,
    to_json,
)
from kvroute_bench.report import counters_markdown
from kvroute_bench.stats import RequestResult


def engine(requests: float, queries: float, hits: float, ttft_sum: float
           ) -> promtext.EngineDelta:
    return promtext.EngineDelta(requests=requests, prompt_tokens=queries, generation_tokens=0,
                                prefix_queries=queries, prefix_hits=hits, ttft_sum_s=ttft_sum,
                                ttft_count=requests)


def results(ttft: float) -> list[RequestResult]:
    return [RequestResult(index=i, sent_s=float(i), first_token_s=i + ttft, done_s=i + 1.0,
                          output_tokens=8) for i in range(4)]


def test_result_combines_client_and_engine_numbers() -> None:
    direct, router = CONTENDERS.select(["direct-rr", "vllm-router-rr"])
    fleet = promtext.FleetDelta([engine(3, 3000, 1500, 0.6), engine(1, 1000, 0, 0.2)])
    r = contender_result(direct, [results(0.25)], fleet)
    assert r.requests == 4 and r.errors == 0
    assert r.prefix_hit_rate == 1500 / 4000
    assert r.requests_per_engine == [3, 1] and r.request_imbalance == 1.5
    assert r.computed_tokens_per_engine == [1500, 1000]
    assert math.isclose(r.engine_ttft_mean_s, 0.2)
    assert r.engine_ttft_mean_per_engine_s == pytest.approx([0.2, 0.2])
    assert math.isclose(r.outside_engine_ttft_s, 0.05)
    routed = contender_result(router, [results(0.27)], fleet)
    assert math.isclose(routed.outside_engine_ttft_s, 0.07)
    assert math.isnan(routed.router_added_s)  # set by the overhead probe, not from the window
    skipped = skipped_result(CONTENDERS.select(["sglang-router-cache"])[0], "not installed")
    assert math.isnan(skipped.router_added_s) and skipped.skipped == "not installed"


def test_engine_preemptions_are_counted_and_reported() -> None:
    """vLLM's preemption counter moves into the result and the markdown; a run without any
    says nothing about them."""
    direct = CONTENDERS.select(["direct-rr"])[0]
    sample: promtext.Sample = (promtext.PREEMPTIONS, ())
    before, after = {sample: 5.0}, {sample: 12.0}
    busy = dataclasses.replace(engine(3, 3000, 1500, 0.6),
                               preemptions=promtext.delta(before, after).preemptions)
    fleet = promtext.combine([promtext.FleetDelta([busy, engine(1, 1000, 0, 0.2)])] * 2)
    r = contender_result(direct, [results(0.25)], fleet)
    assert r.engine_preemptions == 14
    assert "Engine preemptions over the measured window" in counters_markdown([r])
    calm = contender_result(direct, [results(0.25)],
                            promtext.FleetDelta([engine(1, 1000, 0, 0.2)]))
    assert calm.engine_preemptions == 0 and counters_markdown([calm]) == ""


def test_json_has_no_nan() -> None:
    skipped = skipped_result(CONTENDERS.select(["direct-rr"])[0], "because")
    text = json.dumps(to_json([skipped], {"workload": "chat"}), allow_nan=False)
    data = json.loads(text)
    assert data["contenders"][0]["ttft_p50_s"] is None
    assert data["contenders"][0]["skipped"] == "because"


def test_repeats_pool_requests_and_add_engine_counters() -> None:
    router = CONTENDERS.select(["vllm-router-rr"])[0]
    one = Measurement(results(0.2), promtext.FleetDelta([engine(2, 100, 50, 0.4),
                                                         engine(2, 100, 0, 0.4)]), 0.004)
    two = Measurement(results(0.4), promtext.FleetDelta([engine(2, 100, 100, 0.8),
                                                         engine(2, 100, 50, 0.8)]), 0.006)
    r = aggregate(router, [one, two])
    assert r.rounds == 2 and r.requests == 8
    assert r.requests_per_engine == [4, 4]
    assert r.prefix_hit_rate == 200 / 400
    assert math.isclose(r.router_added_s, 0.005)
    assert math.isclose(r.window_s, 2 * 4.0)  # each round: first send 0 to last finish 4
    assert math.isclose(r.ttft_p50_s, 0.3)
    assert math.isnan(r.router_cpu_ms_per_request)  # a round without a CPU reading
    one.router_cpu_s, two.router_cpu_s = 0.02, 0.06
    assert math.isclose(aggregate(router, [one, two]).router_cpu_ms_per_request, 80.0 / 8)
    one.router_counters = {"kvroute_retries_total": 2.0, "kvroute_x_total": 1.0}
    two.router_counters = {"kvroute_retries_total": 3.0}
    assert aggregate(router, [one, two]).router_counters == {"kvroute_retries_total": 5.0,
                                                             "kvroute_x_total": 1.0}


def test_report_round_trips_through_json(tmp_path: Path) -> None:
    from kvroute_bench import report

    direct = CONTENDERS.select(["direct-rr"])[0]
    fleet = promtext.FleetDelta([engine(3, 3000, 1500, 0.6), engine(1, 1000, 0, 0.2)])
    kvroute = contender_result(direct, [results(0.25)], fleet)
    kvroute.name = "kvroute-precise-cost"
    kvroute.router_counters = {'kvroute_kv_index_forecast_blocks_total{outcome="doomed"}': 1200.0}
    original = [contender_result(direct, [results(0.25)], fleet), kvroute,
                skipped_result(CONTENDERS.select(["vllm-router-kv"])[0], "not installed")]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(to_json(original, {"workload": "chat", "engines": 2})))
    loaded, meta = report.load(path)
    assert meta["workload"] == "chat"
    assert loaded[0].prefix_hit_rate == original[0].prefix_hit_rate
    assert loaded[1].router_counters == kvroute.router_counters and not loaded[0].router_counters
    assert loaded[2].skipped == "not installed" and math.isnan(loaded[2].ttft_p50_s)
    table = report.markdown_table(loaded)
    assert "| direct-rr | 250 |" in table and "| 2.5 |" in table  # prefilled ktok
    written = report.rerender(path)
    assert [p.name for p in written] == ["chat.md", "chat-ttft-cdf.png", "chat-summary.png"]
    assert ('* kvroute-precise-cost: `kvroute_kv_index_forecast_blocks_total{outcome="doomed"}` '
            '1,200') in written[0].read_text()


def test_a_router_that_does_not_answer_has_no_counters_and_does_not_end_the_run() -> None:
    from kvroute_bench.contenders import free_port
    from kvroute_bench.harness import scrape_router_counters

    kvroute, peer = CONTENDERS.select(["kvroute-precise-cost", "sglang-router-cache"])
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert scrape_router_counters(kvroute, [gone]) is None
    assert scrape_router_counters(peer, [gone]) == {}  # a peer is not scraped at all
