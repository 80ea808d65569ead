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
