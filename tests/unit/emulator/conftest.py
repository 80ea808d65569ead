"""An emulated fleet on this test's event loop, serving the test model's tokenizer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kvroute_cli.testmodel import build_test_model
from kvroute_emulator.fleet import EmulatedFleet, FleetConfig
from kvroute_emulator.model.profile import cpu_test_engine

MODEL = "kvroute-test-model"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_model(tmp_path_factory.mktemp("model"), MODEL)




@pytest.fixture
async def fleet(model_dir: Path) -> AsyncIterator[EmulatedFleet]:
    """Two engines, 100x faster than the CPU profile's real time (tests wait on events,
    never on durations)."""
    f = EmulatedFleet(FleetConfig(count=2, profile=cpu_test_engine(), model_dir=model_dir,
                                  served_model_name=MODEL, time_scale=0.01))
    await f.start()
    try:
        yield f
    finally:
        await f.stop()
