"""An emulated fleet (``kvroute_emulator``) on the test's event loop, and the External
InferencePool manifest that points a router at it: shared by the tests that run a real router
in front of emulated engines. ``model_dir`` and ``fleet`` are fixtures for a tier's conftest to
import (tests/unit/emulator, tests/loopback)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kvroute_cli.testmodel import build_test_model
from kvroute_emulator.fleet import EmulatedFleet, FleetConfig
from kvroute_emulator.model.profile import cpu_test_engine

MODEL = "kvroute-test-model"


@contextlib.asynccontextmanager
async def emulated_fleet(model_dir: Path, count: int = 2, time_scale: float = 0.01,
                         scheduling_policy: str = "fcfs") -> AsyncIterator[EmulatedFleet]:
    """``count`` engines, by default 100x faster than the CPU profile's real time (tests wait
    on events, never on durations)."""
    fleet = EmulatedFleet(FleetConfig(count=count, profile=cpu_test_engine(),
                                      model_dir=model_dir, served_model_name=MODEL,
                                      time_scale=time_scale,
                                      scheduling_policy=scheduling_policy))
    await fleet.start()
    try:
        yield fleet
    finally:
        await fleet.stop()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The byte-level test model (tokenizer and config), built once per session."""
    return build_test_model(tmp_path_factory.mktemp("model"), MODEL)


@pytest.fixture
async def fleet(model_dir: Path) -> AsyncIterator[EmulatedFleet]:
    """Two engines, 100x faster than the CPU profile's real time."""
    async with emulated_fleet(model_dir) as f:
        yield f


def fleet_pool(fleet: EmulatedFleet, name: str = "emu") -> dict[str, Any]:
    """An External InferencePool of the fleet's engines, with their KV-event endpoints."""
    return {"apiVersion": "kvroute.io/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": name},
            "spec": {"mode": "External", "model": {"name": MODEL},
                     "engine": {"blockSize": fleet.config.profile.block_size},
                     "resources": {"gpus": 0},
                     "endpoints": [{"name": e["name"],
                                    "address": e["url"].removeprefix("http://"),
                                    "kvEventsEndpoint": e["kv_events_endpoint"],
                                    "kvEventsReplayEndpoint": e["replay_endpoint"]}
                                   for e in fleet.endpoints()]}}
