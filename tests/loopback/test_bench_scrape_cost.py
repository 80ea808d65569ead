"""``bench/scrape_cost.py`` measures what it says against a served engine (here an emulated
one in this process): both paths answered, the restricted page the smaller, CPU read for the
router side and for the engine's process."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import scrape_cost
from kvroute_emulator.fleet import EmulatedFleet, FleetConfig, fleet_in_thread
from kvroute_emulator.model.profile import cpu_test_engine

from tests.emulated import MODEL

pytestmark = pytest.mark.loopback


@pytest.fixture
def fleet_address(model_dir: Path) -> Iterator[str]:
    """One emulated engine on a thread of its own (the command runs its own event loop)."""
    config = FleetConfig(count=1, profile=cpu_test_engine(), model_dir=model_dir,
                         served_model_name=MODEL, time_scale=0.01)
    with fleet_in_thread(config) as fleet:
        yield fleet.endpoints()[0]["url"].removeprefix("http://")


async def test_both_pages_are_scraped_and_measured(fleet: EmulatedFleet, tmp_path: Path
                                                   ) -> None:
    address = fleet.endpoints()[0]["url"].removeprefix("http://")
    whole = await scrape_cost.one_round(address, scrape_cost.PATHS["whole"], 20, os.getpid())
    restricted = await scrape_cost.one_round(address, scrape_cost.PATHS["restricted"], 20,
                                             os.getpid())
    assert 0 < restricted["bytes"] * 3 < whole["bytes"]
    for result in (whole, restricted):
        assert result["router_cpu_ms"] > 0 and result["engine_cpu_ms"] >= 0
        assert result["wall_ms"] > 0


def test_the_command_refuses_addresses_off_loopback(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        scrape_cost.main(["--address", "10.0.0.1:8000", "--json", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_the_command_writes_its_summary(fleet_address: str, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert scrape_cost.main(["--address", fleet_address, "--scrapes", "5", "--rounds", "2",
                             "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {"whole", "restricted"}
    assert all(len(rounds) == 2 for rounds in data["rounds"].values())
    assert data["summary"]["restricted"]["bytes"] < data["summary"]["whole"]["bytes"]
