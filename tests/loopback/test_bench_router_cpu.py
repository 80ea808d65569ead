"""``bench/router_cpu.py cpu`` end to end at the smallest size: it starts the emulated engines
and kvroute's router as processes, sends its requests through the router and reads the
router's CPU. (The command's own fleet set-up once fell out of step with the emulator's
arguments and failed before sending anything; only running it shows that.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import router_cpu

pytestmark = pytest.mark.loopback


def test_the_cpu_measurement_runs_through_the_router(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    router_cpu.main(["cpu", "--contender", "kvroute-queue", "--engines", "2", "--requests", "20",
                     "--warmup", "2", "--rate", "10", "--output-tokens", "2", "--context", "512",
                     "--max-context", "2048", "--idle-seconds", "1", "--json", str(out)])
    result = json.loads(out.read_text())["result"]
    assert result["engines"] == 2 and result["requests"] == 20
    assert result["errors"] == 0 and not result["error_samples"]
    assert result["router_cpu_s"] > 0 and result["gross_cpu_ms_per_request"] > 0
    # The idle cost per scrape divides by the scrapes the router counted, not by a period.
    assert result["idle_scrapes"] >= 1
    assert result["window_scrapes"] >= 1  # both engines are scraped while requests run
