"""Percentiles, throughput and error counting of a measured window."""

from __future__ import annotations

import math

import pytest
from kvroute_bench.stats import RequestResult, percentile, summarize


def ok(index: int, sent: float, first: float, done: float, tokens: int) -> RequestResult:
    return RequestResult(index=index, sent_s=sent, first_token_s=first, done_s=done,
                         output_tokens=tokens)


def test_percentile_interpolates_and_ignores_nan() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, math.nan, 3.0], 100) == 3.0
    assert math.isnan(percentile([], 50))


def test_summary_counts_errors_and_times_only_successes() -> None:
    results = [
        ok(0, 0.0, 0.1, 1.0, 10),
        ok(1, 1.0, 1.3, 2.0, 10),
        RequestResult(index=2, sent_s=1.5, error="HTTP 500: boom"),
        ok(3, 2.0, 2.2, 4.0, 20),
    ]
    s = summarize(results)
    assert s.requests == 4 and s.errors == 1
    assert s.ttft_p50_s == pytest.approx(0.2)
    assert s.ttft_mean_s == pytest.approx(0.2)
    assert s.e2e_p50_s == pytest.approx(1.0)
    assert s.window_s == pytest.approx(4.0)
    assert s.output_tokens_per_s == pytest.approx(40 / 4.0)
    assert s.requests_per_s == pytest.approx(3 / 4.0)


def test_a_result_without_a_first_token_is_not_ok() -> None:
    r = RequestResult(index=0, sent_s=0.0, done_s=1.0)
    assert not r.ok and math.isnan(r.ttft_s)
    s = summarize([r])
    assert s.errors == 1 and math.isnan(s.ttft_p50_s) and math.isnan(s.output_tokens_per_s)


def test_empty_window() -> None:
    s = summarize([])
    assert s.requests == 0 and s.window_s == 0.0
