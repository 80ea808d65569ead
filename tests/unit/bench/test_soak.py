"""bench/soak.py's pure parts: a /metrics page into a sample row, growth by least squares,
the report and the plot (the run itself is a benchmark, not a test)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import soak

PAGE = """# HELP process_resident_memory_bytes Resident memory size in bytes.
process_resident_memory_bytes 1.048576e+08
kvroute_asyncio_tasks 31.0
kvroute_kv_index_blocks{pool="default/emu",endpoint="e0"} 10.0
kvroute_kv_index_blocks{pool="default/emu",endpoint="e1"} 5.0
kvroute_in_flight_requests{pool="default/emu",endpoint="e0"} 2.0
kvroute_internal_entries{table="budget_meter_keys"} 3.0
"""


def _rows(rss_per_s: float) -> list[dict[str, Any]]:
    rows = []
    for t in range(0, 200, 10):
        row = soak.sample(PAGE, os.getpid(), float(t))
        row["rss_mb"] = 100.0 + rss_per_s * t
        row["sent"] = t
        rows.append(row)
    return rows


def test_a_metrics_page_becomes_a_row() -> None:
    row = soak.sample(PAGE, os.getpid(), 12.0)
    assert row["rss_mb"] == 100.0
    assert row["asyncio_tasks"] == 31.0
    assert row["index_blocks"] == 15.0
    assert row["index_blocks_by_engine"] == {"e0": 10.0, "e1": 5.0}
    assert row["in_flight"] == 2.0
    assert row["tables"] == {"budget_meter_keys": 3.0}
    assert isinstance(row["open_fds"], int) and row["open_fds"] > 0  # this process's


def test_growth_is_the_slope_per_hour_after_the_warm_up() -> None:
    growth = soak.growth(_rows(0.01), warmup_s=50)
    assert growth["rss_mb"]["slope_per_h"] == pytest.approx(36.0)
    assert growth["rss_mb"]["start"] == pytest.approx(100.5)
    assert growth["asyncio_tasks"]["slope_per_h"] == pytest.approx(0.0, abs=1e-9)
    assert growth["table:budget_meter_keys"]["end"] == 3.0


def test_report_and_plot(tmp_path: Path) -> None:
    rows = _rows(0.0)
    data = {"meta": {"engines": 4, "sample_s": 10, "started": "now", "duration_s": 200,
                     "rate": 4, "tenants": 24, "disconnect_share": 0.03, "invalid_share": 0.02,
                     "warmup_s": 50, "machine": "m", "load_start": [1], "load_end": [1],
                     "router_exit": 0},
            "requests": {"sent": 20, "ok": 20}, "failures": [],
            "growth": soak.growth(rows, 50), "samples": rows}
    text = soak.report(data, "python bench/soak.py")
    assert "| 20 | 20 | 0 | 0 | 0 | 0 | 0 |" in text
    soak.plot(rows, 50, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").read_bytes().startswith(b"\x89PNG")
