"""Parsing vLLM's /metrics text and the per-engine deltas of a measured window."""

from __future__ import annotations

import math

import pytest
from kvroute_bench import promtext

BEFORE = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="kvroute-test-model"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="kvroute-test-model"} 400.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 10.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 2.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 3.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 12.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 5.0
vllm:cache_config_info{block_size="32",prefix_caching_hash_algo="sha256_cbor"} 1.0
"""

_CHANGES = {
    "} 1000.0": "} 3000.0",  # prefix-cache queries
    "} 400.0": "} 1900.0",  # prefix-cache hits
    'reason="length",model_name="m"} 10.0': 'reason="length",model_name="m"} 20.0',
    'sum{engine="0",model_name="m"} 3.0': 'sum{engine="0",model_name="m"} 5.0',
    'count{engine="0",model_name="m"} 12.0': 'count{engine="0",model_name="m"} 22.0',
}
AFTER = BEFORE
for old, new in _CHANGES.items():
    AFTER = AFTER.replace(old, new)


def test_parse_keys_by_name_and_sorted_labels() -> None:
    samples = promtext.parse(BEFORE)
    key = ("vllm:cache_config_info",
           (("block_size", "32"), ("prefix_caching_hash_algo", "sha256_cbor")))
    assert samples[key] == 1.0
    assert promtext.total(samples, promtext.REQUESTS) == 12.0
    assert promtext.total(samples, "absent_metric") == 0.0


def test_parse_skips_comments_garbage_and_handles_escaped_quotes() -> None:
    samples = promtext.parse('# c\n\nbad line here\nx{a="q\\"x"} 2\ny 1.5e3 1700000000\n')
    assert samples[("x", (("a", 'q\\"x'),))] == 2.0
    assert samples[("y", ())] == 1500.0


def test_delta_of_one_engine() -> None:
    d = promtext.delta(promtext.parse(BEFORE), promtext.parse(AFTER))
    assert d.requests == 10.0
    assert d.prefix_queries == 2000.0 and d.prefix_hits == 1500.0
    assert d.computed_prompt_tokens == 500.0
    assert d.ttft_sum_s == 2.0 and d.ttft_count == 10.0


def test_counter_reset_reads_as_the_after_value() -> None:
    d = promtext.delta(promtext.parse(AFTER), promtext.parse(BEFORE))
    assert d.prefix_queries == 1000.0


def test_fleet_hit_rate_ttft_and_imbalance() -> None:
    one = promtext.delta(promtext.parse(BEFORE), promtext.parse(AFTER))
    idle = promtext.delta(promtext.parse(BEFORE), promtext.parse(BEFORE))
    fleet = promtext.FleetDelta([one, idle])
    assert fleet.prefix_hit_rate == pytest.approx(0.75)
    assert fleet.engine_ttft_mean_s == pytest.approx(0.2)
    assert fleet.requests_per_engine == [10.0, 0.0]
    assert promtext.imbalance(fleet.requests_per_engine) == pytest.approx(2.0)
    assert promtext.imbalance([5.0, 5.0, 5.0]) == 1.0
    assert math.isnan(promtext.imbalance([0.0, 0.0]))
    assert math.isnan(promtext.FleetDelta([idle]).engine_ttft_mean_s)


def test_engine_deltas_need_matching_scrapes() -> None:
    with pytest.raises(ValueError, match="do not match"):
        promtext.engine_deltas([{}], [{}, {}])


LAG_BEFORE = """\
kvroute_event_loop_lag_seconds_bucket{le="0.001"} 10.0
kvroute_event_loop_lag_seconds_bucket{le="0.005"} 12.0
kvroute_event_loop_lag_seconds_bucket{le="0.025"} 12.0
kvroute_event_loop_lag_seconds_bucket{le="+Inf"} 12.0
kvroute_gc_pause_seconds_bucket{generation="2",le="0.001"} 1.0
kvroute_gc_pause_seconds_bucket{generation="2",le="+Inf"} 1.0
"""
LAG_AFTER = """\
kvroute_event_loop_lag_seconds_bucket{le="0.001"} 107.0
kvroute_event_loop_lag_seconds_bucket{le="0.005"} 111.0
kvroute_event_loop_lag_seconds_bucket{le="0.025"} 112.0
kvroute_event_loop_lag_seconds_bucket{le="+Inf"} 112.0
kvroute_gc_pause_seconds_bucket{generation="2",le="0.001"} 1.0
kvroute_gc_pause_seconds_bucket{generation="2",le="+Inf"} 3.0
kvroute_gc_pause_seconds_bucket{generation="0",le="0.001"} 50.0
kvroute_gc_pause_seconds_bucket{generation="0",le="+Inf"} 50.0
"""


def test_histogram_deltas_keep_only_the_window_and_the_asked_labels() -> None:
    before, after = promtext.parse(LAG_BEFORE), promtext.parse(LAG_AFTER)
    lag = promtext.histogram_delta(before, after, "kvroute_event_loop_lag_seconds")
    assert lag == [(0.001, 97.0), (0.005, 2.0), (0.025, 1.0), (math.inf, 0.0)]
    assert promtext.bucket_quantile(lag, 50) == 0.001
    assert promtext.bucket_quantile(lag, 99) == 0.005  # the 99th of 100 lies in (1, 5] ms
    assert promtext.bucket_quantile(lag, 100) == 0.025
    assert promtext.count_above(lag, 0.005) == 1.0
    full = promtext.histogram_delta(before, after, "kvroute_gc_pause_seconds", generation="2")
    assert full == [(0.001, 0.0), (math.inf, 2.0)]  # two new passes, both over 1 ms
    assert promtext.bucket_quantile(full, 50) == math.inf
    assert math.isnan(promtext.bucket_quantile(
        promtext.histogram_delta(before, before, "kvroute_gc_pause_seconds"), 99))


ROUTER_BEFORE = """\
# TYPE kvroute_kv_index_forecast_blocks counter
kvroute_kv_index_forecast_blocks_total{endpoint="10.0.0.1:8000",outcome="doomed"} 5.0
kvroute_kv_index_forecast_blocks_total{endpoint="10.0.0.2:8000",outcome="doomed"} 7.0
kvroute_kv_index_forecast_blocks_total{endpoint="10.0.0.1:8000",outcome="confirmed"} 4.0
kvroute_kv_index_blocks{endpoint="10.0.0.1:8000"} 900.0
kvroute_ttft_seconds_count 3.0
vllm:request_success_total{engine="0"} 9.0
"""


def test_router_counters_sum_over_endpoints_and_keep_other_labels() -> None:
    counters = promtext.router_counters(promtext.parse(ROUTER_BEFORE))
    # A gauge, a histogram's count and an engine's counter are not the router's counters.
    assert counters == {'kvroute_kv_index_forecast_blocks_total{outcome="doomed"}': 12.0,
                        'kvroute_kv_index_forecast_blocks_total{outcome="confirmed"}': 4.0}


def test_counter_deltas_leave_out_what_did_not_move() -> None:
    before = {"a_total": 5.0, "b_total": 2.0, "c_total": 8.0}
    after = {"a_total": 9.0, "b_total": 2.0, "c_total": 3.0, "d_total": 1.0}
    # c was reset (a restarted router): its after value is what it added.
    assert promtext.counter_deltas(before, after) == {"a_total": 4.0, "c_total": 3.0,
                                                      "d_total": 1.0}
