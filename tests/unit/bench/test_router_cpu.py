"""``bench/router_cpu.py``'s machine probe: a fixed piece of work whose CPU time says how fast
the (shared, virtual) machine ran around a measured window, and the report column that shows
it beside every run."""

from __future__ import annotations

import math

import router_cpu


def test_the_probe_is_the_same_work_every_time() -> None:
    assert router_cpu.probe_work(3) == router_cpu.probe_work(3)
    assert router_cpu.probe_work(3) != router_cpu.probe_work(4)
    assert router_cpu.machine_probe_ms(repeats=3) > 0.0


def test_steal_is_read_from_proc_stat() -> None:
    first = router_cpu.steal_seconds()
    second = router_cpu.steal_seconds()
    # Linux says (a number that never falls); elsewhere the probe says "unknown", not 0.
    assert math.isnan(first) or 0.0 <= first <= second


def test_a_low_rate_ceiling_step_sends_enough_requests_for_a_p99() -> None:
    # 15 s at 2 req/s is 30 requests, whose p99 is the slowest one (router-cpu.md round 19).
    assert router_cpu.step_requests(2.0, 15.0, 200) == 200
    assert router_cpu.step_requests(60.0, 15.0, 200) == 900


def test_scrapes_are_counted_over_every_pool_between_two_reads() -> None:
    before = {("kvroute_scrapes_total", (("pool", "a"),)): 10.0,
              ("kvroute_decision_latency_seconds_count", ()): 5.0}
    after = {("kvroute_scrapes_total", (("pool", "a"),)): 16.0,
             ("kvroute_scrapes_total", (("pool", "b"),)): 3.0,
             ("kvroute_decision_latency_seconds_count", ()): 9.0}
    assert router_cpu.scrapes_between(before, after) == 9.0
    assert router_cpu.scrapes_between({}, {}) == 0.0


def result(**extra: float) -> dict[str, float]:
    base = {"engines": 16, "output_tokens": 2, "requests": 300, "errors": 0, "rate": 20.0,
            "idle_cpu_s_per_s": 0.04, "idle_cpu_ms_per_scrape": 0.25,
            "gross_cpu_ms_per_request": 6.0, "net_cpu_ms_per_request": 3.7,
            "emulator_cpu_ms_per_request": 11.5, "loadavg_before": 0.4, "loadavg_after": 0.3}
    return {**base, **extra}


def test_the_table_shows_the_probe_beside_each_run() -> None:
    table = router_cpu.cpu_table([
        ("probed", result(probe_ms_before=61.4, probe_ms_after=64.6, steal_s=0.12)),
        ("older", result())])
    header, _, probed, older = table.splitlines()
    assert header.endswith("| machine probe ms (before, after; steal s) |")
    assert probed.endswith("| 61.4, 64.6; 0.12 |")
    assert older.endswith("| — |")  # a run recorded before the probe: no number invented


def test_the_router_view_of_a_step_comes_from_its_histogram_deltas() -> None:
    from kvroute_bench import promtext

    before = promtext.parse(
        'kvroute_decision_latency_seconds_bucket{entrypoint="proxy",le="0.001"} 5.0\n'
        'kvroute_decision_latency_seconds_bucket{entrypoint="proxy",le="0.005"} 5.0\n'
        'kvroute_decision_latency_seconds_bucket{entrypoint="proxy",le="+Inf"} 5.0\n'
        'kvroute_prefill_waits_total{outcome="answered",pool="p"} 1.0\n')
    after = promtext.parse(
        'kvroute_decision_latency_seconds_bucket{entrypoint="proxy",le="0.001"} 5.0\n'
        'kvroute_decision_latency_seconds_bucket{entrypoint="proxy",le="0.005"} 103.0\n'
        'kvroute_decision_latency_seconds_bucket{entrypoint="proxy",le="+Inf"} 105.0\n'
        'kvroute_prefill_waits_total{outcome="answered",pool="p"} 3.0\n'
        'kvroute_prefill_waits_total{outcome="timeout",pool="p"} 1.0\n'
        'kvroute_event_loop_lag_seconds_bucket{le="0.005"} 10.0\n'
        'kvroute_event_loop_lag_seconds_bucket{le="0.01"} 12.0\n'
        'kvroute_event_loop_lag_seconds_bucket{le="+Inf"} 12.0\n'
        'kvroute_gc_pause_seconds_bucket{generation="2",le="0.005"} 0.0\n'
        'kvroute_gc_pause_seconds_bucket{generation="2",le="+Inf"} 1.0\n')
    view = router_cpu.router_view(before, after)
    assert view["decision_p50_ms"] == 5.0
    assert view["decision_p99_ms"] == float("inf")  # 2 of 100 past the last bound
    assert view["prefill_waits"] == 3
    assert (view["loop_lag_samples"], view["loop_lag_over_5ms"]) == (12, 2)
    assert view["gc_passes"] == {"0": 0, "1": 0, "2": 1} and view["gc_over_5ms"] == 1
    step = {"rate": 10.0, "added_p99_ms": 9.5, **view}
    rows = router_cpu.breakdown_table([step, {"rate": 2.0}]).splitlines()
    assert len(rows) == 3  # header, rule, the step with a view (the other is left out)
    assert rows[2] == "| 10 | 9.5 | 5 / inf | 10 | 2 of 12 | 0 / 0 / 1 (1) | 3 |"


def test_the_idle_scrape_period_is_read_from_the_router_flags() -> None:
    """The per-scrape idle cost divides by how often an idle router scrapes: its idle period
    (2x the accounted period by default), not the interval."""
    assert router_cpu.idle_scrape_period_ms([]) == 2000.0
    assert router_cpu.idle_scrape_period_ms(["--scrape-interval-ms=1600"]) == 3200.0
    assert router_cpu.idle_scrape_period_ms(["--accounted-scrape-interval-ms=100"]) == 200.0
    assert router_cpu.idle_scrape_period_ms(["--scrape-interval-ms", "200",
                                             "--idle-scrape-interval-ms=200"]) == 200.0
    assert router_cpu.idle_scrape_period_ms(["--idle-scrape-interval-ms=300",
                                             "--idle-scrape-interval-ms=900"]) == 900.0
