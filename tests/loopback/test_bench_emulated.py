"""``kvroute bench --fleet emulated`` end to end at the smallest size: the emulator and
kvroute's router run as processes, the client sends a continuous warm-up and a measured
window through the router and straight to the engines, and the report carries what the engines'
and the router's own counters say about that window."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.loopback


def test_an_emulated_run_reports_the_routers_counters(tmp_path: Path) -> None:
    from kvroute_cli.main import main

    code = main(["bench", "--fleet", "emulated", "--engines", "2", "--profile", "cpu",
                 "--workload", "precise-prefix", "--requests", "12", "--warmup", "4",
                 "--warmup-mode", "continuous", "--rate", "4", "--max-context", "2048",
                 "--contenders", "direct-rr,kvroute-precise-cost", "--out", str(tmp_path),
                 "--name", "t", "--workdir", str(tmp_path / "wd")])
    assert code == 0
    direct, kvroute = json.loads((tmp_path / "t-precise-prefix.json").read_text())["contenders"]
    assert direct["requests"] == kvroute["requests"] == 12
    assert direct["errors"] == kvroute["errors"] == 0
    assert direct["router_counters"] == {}  # no router, no counters
    counters = kvroute["router_counters"]
    answered = sum(v for k, v in counters.items()
                   if k.startswith("kvroute_requests_total{") and 'status="200"' in k)
    # The window opens as the first measured request leaves, so warm-up answers may fall in it.
    assert 12 <= answered <= 16
    assert counters['kvroute_kv_events_decoded_total{type="BlockStored"}'] > 0
    assert counters['kvroute_kv_prefix_scorer_source_total{source="precise"}'] >= 12
    # every dispatched prompt block is counted in one state; each question is new text
    assert counters['kvroute_kv_dispatch_blocks_total{state="new"}'] > 0
    table = (tmp_path / "t-precise-prefix.md").read_text()
    assert "* kvroute-precise-cost: `kvroute_kv_dispatch_blocks_total" in table
    assert '`kvroute_kv_events_decoded_total{type="BlockStored"}`' in table
